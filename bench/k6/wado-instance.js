// WADO-RS instance retrieve: GET {root}/studies/{s}/series/{se}/instances/{sop}, a random instance, as a
// PS3.10 file in multipart/related (no transfer-syntax parameter: Explicit VR Little Endian, as stored).
import { UIDS, get, instanceUrl, pick, options as base } from './lib.js';

export const options = base({ vus: parseInt(__ENV.VUS || '25', 10) });

export default function () {
  get(instanceUrl(pick(UIDS.instances)), 'multipart/related; type="application/dicom"', 'multipart/related');
}
