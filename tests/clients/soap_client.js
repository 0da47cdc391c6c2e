// node-soap (npm `soap`) as a participant's program would use it: a WSDL, mutual TLS through
// ClientSSLSecurity, and `calls` sequential calls of the WSDL's one operation.
//
//   node soap_client.js '{"wsdl":..., "endpoint":..., "key":..., "cert":..., "ca":..., "calls":N}'
//
// Prints one JSON line per call: {"ok":true,"result":...} or {"ok":false,"message":...,
// "code":..., "status":..., "retryAfter":..., "fault":<the parsed soap Fault or null>}.
"use strict";
const fs = require("fs");
const soap = require("soap");

async function main() {
  const options = JSON.parse(process.argv[2]);
  const client = await soap.createClientAsync(options.wsdl, { endpoint: options.endpoint });
  client.setSecurity(
    new soap.ClientSSLSecurity(
      fs.readFileSync(options.key),
      fs.readFileSync(options.cert),
      fs.readFileSync(options.ca),
      { timeout: 20000 },
    ),
  );
  for (let i = 0; i < options.calls; i++) {
    try {
      const [result] = await client.RetrieveResourceOutageAsync({ startTime: "2024-05-01T00:00:00Z" });
      console.log(JSON.stringify({ ok: true, result }));
    } catch (err) {
      const body = err.root && err.root.Envelope && err.root.Envelope.Body;
      console.log(
        JSON.stringify({
          ok: false,
          message: String(err.message),
          code: err.code || null,
          status: err.response ? err.response.status : null,
          retryAfter: err.response ? err.response.headers["retry-after"] || null : null,
          fault: body ? body.Fault || null : null,
        }),
      );
    }
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(2);
});
