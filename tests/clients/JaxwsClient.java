// JAX-WS (the reference implementation, Debian's libjaxws-java) as a typed SOAP client meets a
// fault: a Dispatch<SOAPMessage> over mutual TLS that catches SOAPFaultException and reads the
// fault string and the detail's standard output, as generated JAX-WS clients do.
//
//   java -cp <jars> JaxwsClient.java <keystore.p12> <password> <ca.pem> <url> <soapAction>
//        <envelope file> <calls>
//
// Prints, per call, "OK <local name of the Body's first element>", or "FAULTSTRING <text>",
// "DESCRIPTION <EventLog/Event/description>" and "QUANTITY <EventLog/collectionQuantity>", or
// "EXCEPTION <class>: <message>" for it and each cause.
import java.io.FileInputStream;
import java.security.KeyStore;
import java.security.cert.CertificateFactory;
import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;
import javax.xml.namespace.QName;
import javax.xml.soap.MessageFactory;
import javax.xml.soap.SOAPFault;
import javax.xml.soap.SOAPMessage;
import javax.xml.ws.BindingProvider;
import javax.xml.ws.Dispatch;
import javax.xml.ws.Service;
import javax.xml.ws.soap.SOAPBinding;
import javax.xml.ws.soap.SOAPFaultException;
import org.w3c.dom.Element;
import org.w3c.dom.NodeList;

public class JaxwsClient {
    static final String STANDARD_OUTPUT = "http://www.caiso.com/soa/2006-06-13/StandardOutput.xsd";

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
        HttpsURLConnection.setDefaultSSLSocketFactory(ssl.getSocketFactory());

        QName serviceName = new QName("urn:aup-gateway:test", "Market");
        QName portName = new QName("urn:aup-gateway:test", "MarketPort");
        Service service = Service.create(serviceName);
        service.addPort(portName, SOAPBinding.SOAP11HTTP_BINDING, args[3]);
        Dispatch<SOAPMessage> dispatch = service.createDispatch(portName, SOAPMessage.class, Service.Mode.MESSAGE);
        var context = dispatch.getRequestContext();
        context.put(BindingProvider.SOAPACTION_USE_PROPERTY, Boolean.TRUE);
        context.put(BindingProvider.SOAPACTION_URI_PROPERTY, args[4]);
        context.put("com.sun.xml.ws.connect.timeout", 20000);
        context.put("com.sun.xml.ws.request.timeout", 20000);
        int calls = Integer.parseInt(args[6]);
        for (int i = 0; i < calls; i++) {
            SOAPMessage request;
            try (var in = new FileInputStream(args[5])) {
                request = MessageFactory.newInstance().createMessage(null, in);
            }
            try {
                SOAPMessage reply = dispatch.invoke(request);
                System.out.println("OK " + reply.getSOAPBody().getFirstChild().getLocalName());
            } catch (SOAPFaultException e) {
                SOAPFault fault = e.getFault();
                System.out.println("FAULTSTRING " + fault.getFaultString());
                if (fault.getDetail() != null) {
                    System.out.println("DESCRIPTION " + text(fault.getDetail(), "Event", "description"));
                    System.out.println("QUANTITY " + text(fault.getDetail(), "EventLog", "collectionQuantity"));
                }
            } catch (Exception e) {
                for (Throwable t = e; t != null; t = t.getCause()) {
                    System.out.println("EXCEPTION " + t.getClass().getName() + ": " + t.getMessage());
                }
            }
        }
    }

    /** The text of the first `child` element (StandardOutput namespace) directly under a `parent`. */
    static String text(Element root, String parent, String child) {
        NodeList parents = root.getElementsByTagNameNS(STANDARD_OUTPUT, parent);
        for (int i = 0; i < parents.getLength(); i++) {
            NodeList children = ((Element) parents.item(i)).getChildNodes();
            for (int j = 0; j < children.getLength(); j++) {
                if (children.item(j) instanceof Element el
                        && child.equals(el.getLocalName()) && STANDARD_OUTPUT.equals(el.getNamespaceURI())) {
                    return el.getTextContent();
                }
            }
        }
        return "";
    }
}
