// WADO-RS frame retrieve: GET .../instances/{sop}/frames/1 of a random instance, as uncompressed pixel
// data (multipart/related; type="application/octet-stream", Explicit VR Little Endian as stored)
import { UIDS, get, instanceUrl, pick, options as base } from './lib.js';

export const options = base({ vus: parseInt(__ENV.VUS || '25', 10) });

export default function () {
  get(`${instanceUrl(pick(UIDS.instances))}/frames/1`, 'multipart/related; type="application/octet-stream"',
    'multipart/related');
}
