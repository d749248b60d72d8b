// WADO-RS instance metadata: GET {root}/studies/{s}/series/{se}/instances/{sop}/metadata, a random instance
import { UIDS, get, instanceUrl, pick, options as base } from './lib.js';

export const options = base({ vus: parseInt(__ENV.VUS || '25', 10) });

export default function () {
  get(`${instanceUrl(pick(UIDS.instances))}/metadata`, 'application/dicom+json', 'application/dicom+json');
}
