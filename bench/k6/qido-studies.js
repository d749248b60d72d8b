// QIDO-RS study search: GET {root}/studies[?QUERY], e.g. QUERY="limit=100" (default: no query, all studies).
import { ROOT_URL, get, options as base } from './lib.js';

export const options = base();
const url = __ENV.QUERY ? `${ROOT_URL}/studies?${__ENV.QUERY}` : `${ROOT_URL}/studies`;

export default function () {
  get(url, 'application/dicom+json', 'application/dicom+json');
}
