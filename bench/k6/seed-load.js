// The seed load test: virtual users ramping linearly from 1 to 100 (MAX_VUS) over DURATION (default
// 20m, as in the original), each downloading random instances (WADO-RS, PS3.10 in multipart/related)
// one after another without pause; then HOLD (default 0s) at MAX_VUS. Any failed request or check
// fails the run (thresholds), so k6 exits non-zero unless there were 0 errors.
import { check } from 'k6';
import http from 'k6/http';
import { UIDS, instanceUrl, pick } from './lib.js';

const MAX_VUS = parseInt(__ENV.MAX_VUS || '100', 10);
const stages = [{ duration: __ENV.DURATION || '20m', target: MAX_VUS }];
if (__ENV.HOLD && __ENV.HOLD !== '0s') stages.push({ duration: __ENV.HOLD, target: MAX_VUS });
const MIN_BYTES = parseInt(__ENV.MIN_BYTES || '500000', 10); // a 512x512x16-bit CT is ~525 KB

export const options = {
  scenarios: {
    seed: { executor: 'ramping-vus', startVUs: 1, stages, gracefulRampDown: '30s', gracefulStop: '30s' },
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
  thresholds: { http_req_failed: ['rate==0'], checks: ['rate==1'] },
};

export default function () {
  const res = http.get(instanceUrl(pick(UIDS.instances)), {
    headers: { Accept: 'multipart/related; type="application/dicom"' },
    responseType: 'binary',
  });
  check(res, {
    'status 200': (r) => r.status === 200,
    'multipart/related': (r) => (r.headers['Content-Type'] || '').startsWith('multipart/related'),
    'whole instance': (r) => r.body !== null && r.body.byteLength >= MIN_BYTES,
  });
}
