"""A local Orthanc archive for development, tests and the demo (``make pacs``).

Orthanc and its DICOMweb plugin come from Debian (``apt-get install orthanc orthanc-dicomweb``). This
module starts the ``Orthanc`` binary with a configuration file of our own (never the system service's):
loopback only, free or chosen HTTP and DICOM ports, its storage in a folder we name, the DICOMweb
plugin on. Tests start one per session on free ports in a temporary folder and stop it.

It also turns the bundled sample studies (JPEG files in ``samples/``) into DICOM radiographs, so the
archive has something to serve: ``python -m boneai.pacs_server --dir .pacs`` starts Orthanc, stores
the samples over STOW-RS and runs until interrupted.

Example:
    >>> from boneai.pacs_server import OrthancServer
    >>> with OrthancServer("/tmp/pacs") as orthanc:        # doctest: +SKIP
    ...     print(orthanc.dicomweb_url)                    # doctest: +SKIP
    http://127.0.0.1:40123/dicom-web
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from boneai.errors import BoneAIError

__all__ = ["OrthancServer", "orthanc_unavailable_reason", "find_dicomweb_plugin", "free_port",
           "sample_study_datasets", "SAMPLES_DIR"]

#: Where Debian's orthanc-dicomweb package installs the plugin (Debian 12: ``libOrthancDicomWeb.so``).
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
#: DX Image Storage - For Presentation: what a digital radiography modality sends to the archive.
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
#: Root of the UIDs this module derives for the sample studies (pydicom's prefix; deterministic, so
#: loading the samples twice stores the same instances and the archive keeps one copy).
_SAMPLE_UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def orthanc_binary() -> str | None:
    """Path of the ``Orthanc`` executable, or None when it is not installed."""
    return shutil.which("Orthanc") or (str(Path("/usr/sbin/Orthanc")) if Path("/usr/sbin/Orthanc").is_file() else None)


def find_dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library, or None when ``orthanc-dicomweb`` is not installed."""
    for folder in PLUGIN_DIRS:
        for path in sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []:
            return path
    return None


def orthanc_unavailable_reason() -> str | None:
    """Why a local Orthanc cannot be started here (a sentence), or None when it can."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb, or `make pacs-deps`)"
    if find_dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancServer:
    """One Orthanc process with its own configuration and storage under ``directory``.

    Args:
        directory: holds ``orthanc.json``, ``storage/`` and ``orthanc.log``; created if missing.
        http_port, dicom_port: 0 picks a free port.
        users: optional ``{user: password}``: HTTP basic authentication is then required.
        aet: the archive's DICOM application entity title.
    """

    directory: Path | str
    http_port: int = 0
    dicom_port: int = 0
    users: dict[str, str] | None = None
    aet: str = "BONEAI_PACS"

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Orthanc's REST root, e.g. ``http://127.0.0.1:8042``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS) for :class:`boneai.pacs.ArchiveClient`."""
        return f"{self.url}/dicom-web"

    def config(self) -> dict:
        """The configuration Orthanc is started with (see Orthanc Book, "Configuration file")."""
        plugin = find_dicomweb_plugin()
        return {
            "Name": "BoneAI development archive",
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            # Loopback only: Orthanc then refuses HTTP requests from any other host.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": dict(self.users or {}),
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 1,
            "Plugins": [str(plugin)] if plugin else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                         "Host": f"127.0.0.1:{self.http_port}", "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
            # Orthanc keeps the transfer syntax it receives; WADO-RS transcodes on request (DCMTK).
            "StorageCompression": False,
        }

    def start(self, timeout: float = 30.0) -> OrthancServer:
        """Write the configuration, start Orthanc and wait until its REST API answers.

        Raises:
            BoneAIError: Orthanc or its DICOMweb plugin is missing, or it did not come up (the end of
                its log is in the message).
        """
        reason = orthanc_unavailable_reason()
        if reason:
            raise BoneAIError(reason + ".")
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "storage").mkdir(exist_ok=True)
        config = self.directory / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        log = (self.directory / "orthanc.log").open("ab")
        self._process = subprocess.Popen([orthanc_binary(), str(config)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        tail = (self.directory / "orthanc.log").read_text(errors="replace")[-1500:]
        raise BoneAIError(f"Orthanc did not start on port {self.http_port}; its log ends with:\n{tail}")

    def _answers(self) -> bool:
        request = urllib.request.Request(f"{self.url}/dicom-web/studies?limit=1")
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status in (200, 204)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 10 s); the storage folder stays."""
        proc, self._process = self._process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> OrthancServer:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to stop Orthanc when the process that started it dies, so a
    killed test run or app leaves no archive behind (prctl PR_SET_PDEATHSIG; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: stop() still ends it
        pass


# -- sample studies as DICOM ---------------------------------------------------------------------------
def _uid(*parts: str) -> str:
    """A deterministic UID under :data:`_SAMPLE_UID_PREFIX` from ``parts`` (a hash, in decimal)."""
    digest = int(hashlib.sha256("|".join(parts).encode()).hexdigest()[:30], 16)
    return (_SAMPLE_UID_PREFIX + str(digest))[:64]


def radiograph_dataset(pixels: np.ndarray, *, study_uid: str, series_uid: str, sop_uid: str, instance: int,
                       patient_id: str, patient_name: str, study_date: str, body_part: str,
                       modality: str = "DX", accession: str = "") -> pydicom.Dataset:  # noqa: F821
    """A DX (or CR) radiograph data set, for presentation, holding 8-bit grey ``pixels``.

    The sample studies get invented patient names and numbers so that the archive looks like a real one
    and the tests can check that none of them reaches what BoneAI stores.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    grey = np.asarray(pixels)
    if grey.ndim == 3:  # RGB JPEG of a radiograph: the grey levels the model reads (ITU-R 601 luma)
        from PIL import Image

        grey = np.asarray(Image.fromarray(grey[:, :, :3]).convert("L"))
    grey = np.ascontiguousarray(grey.astype(np.uint8))
    sop_class = DX_FOR_PRESENTATION if modality == "DX" else "1.2.840.10008.5.1.4.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyDate, ds.SeriesDate, ds.ContentDate = study_date, study_date, study_date
    ds.StudyTime, ds.SeriesTime, ds.ContentTime = "090000", "090000", "090000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = accession, accession[-8:] or "1", ""
    ds.StudyDescription = f"XR {body_part.title()}"
    ds.Modality, ds.BodyPartExamined = modality, body_part
    ds.SeriesNumber, ds.InstanceNumber = 1, instance
    ds.Manufacturer = "BoneAI samples"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ""
    ds.ImageLaterality = "U"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = grey.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = grey.tobytes()
    return ds


def _sample_studies(samples: Path) -> list[tuple[str, list[Path], str]]:
    """(study name, files, body part) of every bundled fracture sample: multi-view studies, then singles."""
    import pandas as pd

    out: list[tuple[str, list[Path], str]] = []
    in_studies: set[str] = set()
    root = samples / "studies"
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if files:
            out.append((folder.name, files, "EXTREMITY"))
            in_studies.update(str(f.relative_to(samples)) for f in files)
    table = samples / "samples.csv"
    if table.is_file():
        df = pd.read_csv(table)
        for row in df[df["dataset"].astype(str).str.contains("frac", case=False)].itertuples():
            path = samples / str(row.file)
            if str(row.file) in in_studies or not path.is_file():
                continue
            region = str(row.region).upper() if isinstance(row.region, str) else "EXTREMITY"
            out.append((Path(row.file).stem, [path], region))
    return out


def sample_study_datasets(samples: Path | str = SAMPLES_DIR) -> list[pydicom.Dataset]:  # noqa: F821
    """The bundled fracture samples as DICOM radiographs, one study per sample study or single view.

    UIDs are derived from the file names, so they are the same on every machine and every run. Study
    dates count back one day per study from 2026-11-30, so "newest first" has an order to show.
    """
    from boneai.io import read_radiograph

    datasets = []
    for k, (name, files, body_part) in enumerate(_sample_studies(Path(samples))):
        study_uid = _uid("study", name)
        series_uid = _uid("series", name)
        date = (datetime.date(2026, 11, 30) - datetime.timedelta(days=k)).strftime("%Y%m%d")
        for i, path in enumerate(files, 1):
            pixels = read_radiograph(path).pixels
            datasets.append(radiograph_dataset(
                pixels, study_uid=study_uid, series_uid=series_uid, sop_uid=_uid("image", name, path.name),
                instance=i, patient_id=f"SAMPLE-{k + 1:04d}", patient_name=f"SAMPLE^PATIENT{k + 1:02d}",
                study_date=date, body_part=body_part, accession=f"ACC{k + 1:06d}"))
    return datasets


def load_samples(dicomweb_url: str, samples: Path | str = SAMPLES_DIR, **client_options: object) -> int:
    """Store the sample studies in the archive at ``dicomweb_url`` (STOW-RS); returns the number of instances."""
    from boneai.pacs import ArchiveClient, ArchiveSettings

    client = ArchiveClient(ArchiveSettings(url=dicomweb_url, **client_options))  # type: ignore[arg-type]
    datasets = sample_study_datasets(samples)
    client.store(datasets)
    return len(datasets)


def main(argv: list[str] | None = None) -> int:
    """``python -m boneai.pacs_server``: start Orthanc, load the samples, run until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m boneai.pacs_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".pacs", help="configuration, storage and log folder (default .pacs)")
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("BONEAI_PACS_HTTP_PORT", 8042)),
                        help="HTTP port (DICOMweb); 0 picks a free one (default 8042)")
    parser.add_argument("--dicom-port", type=int, default=int(os.environ.get("BONEAI_PACS_DICOM_PORT", 4242)),
                        help="DICOM port; 0 picks a free one (default 4242)")
    parser.add_argument("--no-samples", action="store_true", help="do not store the sample studies")
    args = parser.parse_args(argv)
    server = OrthancServer(args.dir, http_port=args.http_port, dicom_port=args.dicom_port)
    try:
        server.start()
        count = 0 if args.no_samples else load_samples(server.dicomweb_url)
    except BoneAIError as exc:
        server.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Orthanc at {server.url} (DICOM port {server.dicom_port}, storage {server.directory / 'storage'}); "
          f"{count} sample instances stored.\nDICOMweb: {server.dicomweb_url}\n"
          f"Try: BONEAI_PACS_URL={server.dicomweb_url} make run   (Ctrl-C stops the archive)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill`: stop Orthanc in the finally below
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
