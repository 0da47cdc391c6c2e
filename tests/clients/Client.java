// Java 17's built-in HTTP client (java.net.http) as a participant's program would use it:
// a PKCS12 keystore with the participant's certificate, the operator's CA as the only trust.
//
//   java Client.java <keystore.p12> <password> <ca.pem> <timeout-seconds> <request>...
//   request: METHOD|URL|Content-Type|body file ("-" for none)|expect (1: expectContinue(true))
//
// Prints, per request, "STATUS <code>", "HEADER <name>: <value>" lines and "BODY <text>", or
// "EXCEPTION <class>: <message>" for it and each cause. Exit 0 unless the arguments are wrong.
import java.io.FileInputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.file.Path;
import java.security.KeyStore;
import java.security.cert.CertificateFactory;
import java.time.Duration;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

public class Client {
    public static void main(String[] args) throws Exception {
        char[] password = args[1].toCharArray();
        KeyStore keys = KeyStore.getInstance("PKCS12");
        try (var in = new FileInputStream(args[0])) {
            keys.load(in, password);
        }
        KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(keys, password);
        KeyStore trust = KeyStore.getInstance("PKCS12");
        trust.load(null, null);
        try (var in = new FileInputStream(args[2])) {
            trust.setCertificateEntry("operator-ca", CertificateFactory.getInstance("X.509").generateCertificate(in));
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        SSLContext ssl = SSLContext.getInstance("TLS");
        ssl.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
        Duration timeout = Duration.ofSeconds(Long.parseLong(args[3]));
        HttpClient client = HttpClient.newBuilder()
                .sslContext(ssl)
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(timeout)
                .build();
        for (int i = 4; i < args.length; i++) {
            String[] spec = args[i].split("\\|", -1);
            HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(spec[1]))
                    .timeout(timeout)
                    .header("Content-Type", spec[2])
                    .expectContinue(spec[4].equals("1"));
            request.method(spec[0], spec[3].equals("-")
                    ? HttpRequest.BodyPublishers.noBody()
                    : HttpRequest.BodyPublishers.ofFile(Path.of(spec[3])));
            try {
                HttpResponse<String> response = client.send(request.build(), HttpResponse.BodyHandlers.ofString());
                System.out.println("STATUS " + response.statusCode());
                response.headers().map().forEach((name, values) -> {
                    for (String value : values) System.out.println("HEADER " + name + ": " + value);
                });
                System.out.println("BODY " + response.body().replace("\r", " ").replace("\n", " "));
            } catch (Exception e) {
                for (Throwable t = e; t != null; t = t.getCause()) {
                    System.out.println("EXCEPTION " + t.getClass().getName() + ": " + t.getMessage());
                }
            }
        }
    }
}
