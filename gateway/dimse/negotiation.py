"""Which presentation contexts and roles the SCP accepts (PS3.8 9.3.3.2, PS3.7 D.3.3.4). No I/O."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import UID
from pynetdicom import sop_class as _sop_class

from gateway.dimse.pdu import (AAssociateAC, AAssociateRJ, AAssociateRQ, PresentationContextAC, RoleSelection,
                               UserInformation)

VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
QUERY_RETRIEVE = frozenset({PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET,
                            STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET})

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# Syntaxes pydicom both reads and writes: what query identifiers may come in
NATIVE_SYNTAXES = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN,
                   DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)

# Every Storage SOP Class pynetdicom knows (PS3.4 Annex B.5), the non-patient objects stored the same
# way (hanging protocols, color palettes, ...: PS3.4 Annex GG), and the retired and trial storage
# classes of the Storage Service Class tree that legacy modalities still send (PS3.4 B.5 lists them
# as retired; an archive keeps what it is given).
STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    list(_sop_class._STORAGE_CLASSES.values()) + list(_sop_class._NON_PATIENT_OBJECT_CLASSES.values())
    + [uid for uid, (name, kind, *_rest) in UID_dictionary.items()
       if kind == "SOP Class" and "Storage" in name and uid.startswith("1.2.840.10008.5.1.4.1.1.")])

# A-ASSOCIATE-RJ fields (PS3.8 Table 9-21)
RJ_PERMANENT, RJ_TRANSIENT = 1, 2
RJ_SOURCE_USER, RJ_SOURCE_PRESENTATION = 1, 3
RJ_CALLING_AE_NOT_RECOGNIZED, RJ_CALLED_AE_NOT_RECOGNIZED = 3, 7
RJ_APPLICATION_CONTEXT_NOT_SUPPORTED = 2
RJ_LOCAL_LIMIT_EXCEEDED = 2

# Presentation context results (PS3.8 Table 9-18)
ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4


@dataclass(frozen=True, slots=True)
class AcceptancePolicy:
    ae_title: str
    max_pdu_length: int
    check_called_ae: bool = True
    calling_ae_allowlist: tuple[str, ...] = ()


def _storable(ts: str) -> bool:
    """Any transfer syntax pydicom knows: the data set is kept as received, never decoded."""
    uid = UID(ts)
    return uid.is_transfer_syntax


def check_association(rq: AAssociateRQ, policy: AcceptancePolicy) -> AAssociateRJ | None:
    """A rejection if the request must be refused on its AE titles or application context."""
    if rq.application_context != "1.2.840.10008.3.1.1.1":
        return AAssociateRJ(RJ_PERMANENT, RJ_SOURCE_USER, RJ_APPLICATION_CONTEXT_NOT_SUPPORTED)
    if policy.check_called_ae and rq.called_ae.strip() != policy.ae_title:
        return AAssociateRJ(RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLED_AE_NOT_RECOGNIZED)
    if policy.calling_ae_allowlist and rq.calling_ae.strip() not in policy.calling_ae_allowlist:
        return AAssociateRJ(RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLING_AE_NOT_RECOGNIZED)
    return None


def _choose_syntax(abstract: str, proposed: tuple[str, ...]) -> str | None:
    if abstract in STORAGE_SOP_CLASSES:
        # Keep the SCU's order of preference (PS3.8 9.3.2.2 leaves the choice to the acceptor).
        return next((ts for ts in proposed if _storable(ts)), None)
    return next((ts for ts in proposed if ts in NATIVE_SYNTAXES), None)


def negotiate(rq: AAssociateRQ, policy: AcceptancePolicy, *, implementation_class_uid: str,
              implementation_version_name: str) -> AAssociateAC:
    """The A-ASSOCIATE-AC answering `rq` (the association itself was already found acceptable)."""
    contexts = []
    for pc in rq.contexts:
        supported = pc.abstract_syntax == VERIFICATION or pc.abstract_syntax in QUERY_RETRIEVE \
            or pc.abstract_syntax in STORAGE_SOP_CLASSES
        if not supported:
            contexts.append(PresentationContextAC(pc.id, ABSTRACT_SYNTAX_NOT_SUPPORTED, EXPLICIT_VR_LITTLE_ENDIAN))
            continue
        ts = _choose_syntax(pc.abstract_syntax, pc.transfer_syntaxes)
        if ts is None:
            contexts.append(PresentationContextAC(pc.id, TRANSFER_SYNTAXES_NOT_SUPPORTED,
                                                  EXPLICIT_VR_LITTLE_ENDIAN))
        else:
            contexts.append(PresentationContextAC(pc.id, ACCEPTANCE, ts))
    # PS3.7 D.3.3.4: accept the roles proposed for storage SOP classes (C-GET needs the requestor as
    # SCP); for others we keep the default roles and answer with what we support.
    roles = tuple(RoleSelection(r.sop_class_uid, r.scu_role, r.scp_role)
                  for r in rq.user_info.role_selections if r.sop_class_uid in STORAGE_SOP_CLASSES)
    user_info = UserInformation(max_pdu_length=policy.max_pdu_length,
                                implementation_class_uid=implementation_class_uid,
                                implementation_version_name=implementation_version_name,
                                role_selections=roles)
    return AAssociateAC(called_ae=rq.called_ae, calling_ae=rq.calling_ae,
                        application_context=rq.application_context, contexts=tuple(contexts),
                        user_info=user_info)
