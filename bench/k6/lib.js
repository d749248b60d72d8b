// Shared by the DICOMweb benchmark scripts: the target, the UIDs the harness wrote, common options.
//
// Environment (k6 run -e NAME=VALUE):
//   BASE_URL  http://host:port of the server (required)
//   ROOT      DICOMweb root on it: /dicomweb (vna), /dicom-web (Orthanc); default /dicomweb
//   UIDS      path of the JSON file written by bench/web.py (required):
//             {"patient_ids": [...], "studies": [...], "instances": [[study, series, sop], ...],
//              "series": [study, series]}   (series: the large series for metadata-series.js)
//   VUS       virtual users (default 10), DURATION (default 20s)
import http from 'k6/http';
import { check } from 'k6';
import { SharedArray } from 'k6/data';

export const ROOT_URL = `${__ENV.BASE_URL}${__ENV.ROOT || '/dicomweb'}`;

// open() is only allowed in the init context; SharedArray keeps one copy for all VUs
const loaded = new SharedArray('uids', () => [JSON.parse(open(__ENV.UIDS))]);
export const UIDS = loaded[0];

export function options(extra = {}) {
  return Object.assign({
    vus: parseInt(__ENV.VUS || '10', 10),
    duration: __ENV.DURATION || '20s',
    summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
    discardResponseBodies: true, // the harness checks contents once; k6 only times and counts
    thresholds: { http_req_failed: ['rate==0'], checks: ['rate==1'] },
  }, extra);
}

export function pick(list) {
  return list[Math.floor(Math.random() * list.length)];
}

export function instanceUrl(uids) {
  const [study, series, sop] = uids;
  return `${ROOT_URL}/studies/${study}/series/${series}/instances/${sop}`;
}

// GET url with Accept; checks the status and that the answer has the expected media type
export function get(url, accept, expectType, params = {}) {
  const res = http.get(url, Object.assign({ headers: { Accept: accept } }, params));
  const type = res.headers['Content-Type'] || '';
  check(res, {
    'status 200': (r) => r.status === 200,
    [`content type ${expectType}`]: () => type.startsWith(expectType),
  });
  return res;
}
