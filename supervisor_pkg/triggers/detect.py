"""Guess which cloud this machine runs on, cheaply and without surprising anyone.

First the free local hints: the SMBIOS strings the kernel exposes under
/sys/class/dmi/id (sysfs; in a Docker container these world-readable files show
the host's values, as cloud-init's ds-identify and systemd-detect-virt read
them). Only when a hint names a cloud does one metadata request, with a short
timeout, confirm it; with no hint nothing is sent, so a laptop or an on-premises
host never sees traffic to 169.254.169.254. Where DMI is not visible (gVisor,
Firecracker, some Kubernetes sandboxes) the answer is None and the cloud
triggers must be enabled explicitly.

Hints, as the clouds document and ds-identify uses them:
  aws    sys_vendor/bios_vendor "Amazon EC2" (Nitro); bios_version or
         product_version containing "amazon" (Xen); /sys/hypervisor/uuid "ec2..."
  gcp    sys_vendor "Google", product_name "Google Compute Engine"
  azure  chassis_asset_tag 7783-7084-3265-9085-8269-3286-77; or sys_vendor
         "Microsoft Corporation" with product_name "Virtual Machine" (local
         Hyper-V too: the confirming request tells them apart)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # requests (with ssl and libcrypto) costs ~9 MiB of RSS: load it only on a cloud
    import requests

DMI_DIRECTORIES = ("/sys/class/dmi/id", "/sys/devices/virtual/dmi/id")
HYPERVISOR_UUID = "/sys/hypervisor/uuid"
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
DEFAULT_URLS: Mapping[str, str] = {
    "aws": "http://169.254.169.254",
    "gcp": "http://169.254.169.254",
    "azure": "http://169.254.169.254",
}
_DMI_FIELDS = ("sys_vendor", "product_name", "product_version", "bios_vendor", "bios_version",
               "board_vendor", "chassis_vendor", "chassis_asset_tag")


def detect_cloud(
    timeout: float = 0.3,
    urls: Mapping[str, str] | None = None,
    dmi_directories: tuple[str, ...] = DMI_DIRECTORIES,
    hypervisor_uuid: str = HYPERVISOR_UUID,
    session: requests.Session | None = None,
) -> str | None:
    """"aws", "gcp" or "azure" when a local hint says so and its metadata service confirms; else None.

    At most one request, bounded by `timeout` to connect and `timeout` to
    answer, so start-up waits at most 2 x timeout (0.6 s by default). The URLs
    must be IP addresses: a host name's DNS lookup is not bounded by timeout.
    """
    cloud = cloud_hint(dmi_directories, hypervisor_uuid)
    if cloud is None:
        return None
    import requests

    from supervisor_pkg.triggers.metadata_http import new_session

    base_url = {**DEFAULT_URLS, **(urls or {})}[cloud].rstrip("/")
    owned = session is None
    session = new_session() if session is None else session
    try:
        return cloud if _confirmed(session, cloud, base_url, timeout) else None
    except requests.RequestException:
        return None
    finally:
        if owned:
            session.close()


def cloud_hint(
    dmi_directories: tuple[str, ...] = DMI_DIRECTORIES, hypervisor_uuid: str = HYPERVISOR_UUID,
) -> str | None:
    """The cloud the local hints name, without any network traffic."""
    dmi = _read_dmi(dmi_directories)
    vendor, product = dmi.get("sys_vendor", ""), dmi.get("product_name", "")
    if (
        "amazon" in vendor.lower()
        or "amazon" in dmi.get("bios_vendor", "").lower()
        or "amazon" in dmi.get("bios_version", "").lower()
        or "amazon" in dmi.get("product_version", "").lower()
        or _read(Path(hypervisor_uuid)).lower().startswith("ec2")
    ):
        return "aws"
    if vendor == "Google" or product == "Google Compute Engine":
        return "gcp"
    if dmi.get("chassis_asset_tag") == AZURE_ASSET_TAG or (
        vendor == "Microsoft Corporation" and product == "Virtual Machine"
    ):
        return "azure"
    return None


def _confirmed(session: requests.Session, cloud: str, base_url: str, timeout: float) -> bool:
    limits = (timeout, timeout)
    if cloud == "aws":
        # A GET, not the token PUT: the PUT's answer may be dropped by the hop
        # limit (see aws.py), while any answer, 200 (IMDSv1 allowed) or 401
        # (IMDSv2 required), proves IMDS is there.
        response = session.get(base_url + "/latest/meta-data/", timeout=limits, allow_redirects=False)
        return response.status_code in (200, 401)
    if cloud == "gcp":
        response = session.get(base_url + "/computeMetadata/v1/instance/preempted", timeout=limits,
                               headers={"Metadata-Flavor": "Google"}, allow_redirects=False)
        return response.status_code == 200 and response.headers.get("Metadata-Flavor") == "Google"
    response = session.get(base_url + "/metadata/instance/compute/name", timeout=limits,
                           headers={"Metadata": "true"}, params={"api-version": "2021-02-01", "format": "text"},
                           allow_redirects=False)
    return response.status_code == 200


def _read_dmi(dmi_directories: tuple[str, ...]) -> dict[str, str]:
    for directory in dmi_directories:
        values = {field: _read(Path(directory) / field) for field in _DMI_FIELDS}
        if any(values.values()):
            return values
    return {}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:  # absent, not readable (product_uuid and serials are root-only), or not sysfs at all
        return ""
