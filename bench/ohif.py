"""The demo on a PACS, seen from OHIF: Orthanc + the brain demo as DICOM + our server + OHIF in Chromium.

Starts Orthanc on a free loopback port, stores the demo studies (`make data`) with `crossmodal data to-dicom`,
starts `monailabel start_server` against its DICOMweb root, then for each model opens one unlabelled study in the
bundled OHIF, connects the MONAI Label panel, presses Run and times the click -> overlay drawn (the first request
of a study includes fetching its three series from the PACS; the second model's does not). Also times the same
request through MONAI Label's REST client. Prints a table, writes `ohif.json` to RESULTS_DIR (default
bench/results) and the screenshots to docs/ (`ohif_brain.png` is the README's).

    python bench/ohif.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from benchutil import results_dir  # noqa: E402
from conftest import start_server, stop_server  # noqa: E402
from crossmodal.ohif import run_model_in_ohif  # noqa: E402
from crossmodal.orthanc import Orthanc  # noqa: E402
from crossmodal.serving.dicomweb import make_client  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402

DEMO = REPO / "data" / "brain"


def main() -> int:
    results = results_dir()
    if not (DEMO / ".done").is_file():
        raise SystemExit(f"{DEMO}: no demo data; run `make data` first")
    root = Path(tempfile.mkdtemp(prefix="bench-ohif-"))
    orthanc = Orthanc(root / "orthanc").start()
    server = None
    try:
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "crossmodal.cli", "data", "to-dicom", "--studies", str(DEMO),
                        "--config", "brain", "--upload", orthanc.dicomweb], check=True, stdout=subprocess.DEVNULL)
        upload_s = time.monotonic() - t
        server = start_server(orthanc.dicomweb, root / "model", root / "server.log",
                              {"preset": "brain", "pacs_cache": str(root / "cache")})
        client = make_client(orthanc.dicomweb)
        rows = []
        for case, model in (("brain010", "crossmodal"), ("brain010", "baseline_unet"), ("brain011", "crossmodal")):
            series = client.search_for_series(search_filters={"PatientID": case, "SeriesDescription": "t1"})[0]
            study, t1 = series["0020000D"]["Value"][0], series["0020000E"]["Value"][0]
            run = run_model_in_ohif(server.url, study, model, root / f"{case}_{model}")
            t = time.monotonic()
            MONAILabelClient(server.url, tmpdir=str(root)).infer(model, t1, {"result_extension": ".nrrd"})
            rest_s = time.monotonic() - t
            rows.append({"case": case, "model": model, "ohif_run_to_overlay_s": round(run.seconds_to_overlay, 2),
                         "rest_infer_s": round(rest_s, 2), "infer_status": run.infer_status,
                         "overlay_pixels": run.overlay_after - run.overlay_before})
            if (case, model) == ("brain011", "crossmodal"):
                docs = REPO / "docs"
                docs.mkdir(exist_ok=True)
                shutil.copy(run.screenshots["segmentation"], docs / "ohif_brain.png")
    finally:
        if server:
            stop_server(server)
        orthanc.stop()
    print(f"12 demo studies stored in Orthanc in {upload_s:.1f} s")
    print(f"{'case':10} {'model':14} {'Run->overlay s':>15} {'REST infer s':>13} {'overlay px':>11}")
    for r in rows:
        print(f"{r['case']:10} {r['model']:14} {r['ohif_run_to_overlay_s']:15.2f} {r['rest_infer_s']:13.2f} "
              f"{r['overlay_pixels']:11d}")
    out = {"upload_12_studies_s": round(upload_s, 2), "runs": rows,
           "note": "first OHIF run of brain010 fetches its 3 series from Orthanc; REST infer re-uses the cache"}
    (results / "ohif.json").write_text(json.dumps(out, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
