// QIDO-RS study search by patient: GET {root}/studies?PatientID={one of UIDS.patient_ids, at random}
import { ROOT_URL, UIDS, get, pick, options as base } from './lib.js';

export const options = base();

export default function () {
  const pid = encodeURIComponent(pick(UIDS.patient_ids));
  get(`${ROOT_URL}/studies?PatientID=${pid}`, 'application/dicom+json', 'application/dicom+json');
}
