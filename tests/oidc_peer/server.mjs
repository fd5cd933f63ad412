// An OpenID Connect provider for the tests: panva's oidc-provider (a
// certified OpenID Provider implementation), on loopback, with clients that
// get JWT access tokens (RFC 9068) through the client credentials grant
// (RFC 6749 4.4) for the resource "urn:dicom-appliance" (audience
// "dicom-appliance").  The signing key is made at start (RSA 2048, RS256).
//
//   node server.mjs [PORT]     prints "listening PORT" once it listens
//
// Clients (secrets are test values, not secrets):
//   dicom-script / script-secret   may ask for dicom.read dicom.write dicom.delete
//   dicom-viewer / viewer-secret   may ask for dicom.read
import { generateKeyPairSync } from 'node:crypto';
import http from 'node:http';

import Provider from 'oidc-provider';

const port = Number(process.argv[2] ?? 0);
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-key-1', use: 'sig', alg: 'RS256' };

const server = http.createServer();
server.listen(port, '127.0.0.1', () => {
  const actual = server.address().port;
  const provider = new Provider(`http://127.0.0.1:${actual}`, {
    clients: [
      {
        client_id: 'dicom-script',
        client_secret: 'script-secret',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        scope: 'dicom.read dicom.write dicom.delete',
      },
      {
        client_id: 'dicom-viewer',
        client_secret: 'viewer-secret',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        scope: 'dicom.read',
      },
    ],
    jwks: { keys: [signingKey] },
    scopes: ['openid', 'dicom.read', 'dicom.write', 'dicom.delete'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'urn:dicom-appliance',
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'dicom.read dicom.write dicom.delete',
          audience: 'dicom-appliance',
          accessTokenFormat: 'jwt',
          accessTokenTTL: 300,
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
  });
  server.on('request', provider.callback());
  console.log(`listening ${actual}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
