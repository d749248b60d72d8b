// WADO-RS rendered instance: GET .../instances/{sop}/rendered of a random instance as image/jpeg
// (the server decodes the pixel data, applies the VOI window and encodes a JPEG per request)
import { UIDS, get, instanceUrl, pick, options as base } from './lib.js';

export const options = base({ vus: parseInt(__ENV.VUS || '25', 10) });

export default function () {
  get(`${instanceUrl(pick(UIDS.instances))}/rendered`, 'image/jpeg', 'image/jpeg');
}
