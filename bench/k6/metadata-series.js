// WADO-RS series metadata: GET {root}/studies/{s}/series/{se}/metadata of UIDS.series (a large series)
import { ROOT_URL, UIDS, get, options as base } from './lib.js';

export const options = base();
const [study, series] = UIDS.series;
const url = `${ROOT_URL}/studies/${study}/series/${series}/metadata`;

export default function () {
  get(url, 'application/dicom+json', 'application/dicom+json');
}
