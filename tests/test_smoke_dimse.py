"""dcmtk's echoscu, storescu and findscu against a live server: the shortest path through everything."""

from pydicom.data import get_testdata_file

from tests.conftest import DCMTK, run_tool


async def test_echo_store_find(vna):
    port = str(vna.ports.dicom)
    await run_tool(DCMTK / "echoscu", "-aet", "SCU", "-aec", "VNA", "127.0.0.1", port)
    files = [get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm")]
    await run_tool(DCMTK / "storescu", "-aet", "SCU", "-aec", "VNA", "127.0.0.1", port, *files)
    found = await run_tool(DCMTK / "findscu", "-S", "-aet", "SCU", "-aec", "VNA", "-k", "QueryRetrieveLevel=STUDY",
                           "-k", "PatientName=CompressedSamples^MR*", "-k", "StudyInstanceUID",
                           "127.0.0.1", port)
    assert "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457" in found.stderr
    assert "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322" not in found.stderr
