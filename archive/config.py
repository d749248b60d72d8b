"""The one frozen configuration of a vna process.

Sources, strongest first: command-line flags, environment (``VNA__`` prefix, ``__`` between nested
names, e.g. ``VNA__DICOM__MAX_ASSOCIATIONS=50``), an optional YAML or TOML file (``--config``), defaults.
`Settings.load` validates once, at start, and every part of the program receives the frozen result.
"""

from __future__ import annotations

import tomllib
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsError, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from archive.errors import ConfigError

_AE_CHARS = set(" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijklmnopqrstuvwxyz{|}~")


def validate_ae_title(value: str) -> str:
    """PS3.5 6.2 (AE VR): 1-16 characters, no backslash or control characters, not all spaces."""
    stripped = value.strip()
    if not stripped or len(value) > 16 or not set(value) <= _AE_CHARS:
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DicomSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(64, ge=1)
    max_associations_per_ae: int = Field(16, ge=1)
    # PS3.8 9.3.1: the receiver's maximum P-DATA-TF PDU length we announce (0 would mean unlimited)
    max_pdu_length: int = Field(262_144, ge=4096, le=2**32 - 1)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    check_called_ae: bool = True
    calling_ae_allowlist: Annotated[tuple[str, ...], NoDecode] = ()  # comma-separated in env
    # the largest PDU a peer may send us, whatever it negotiated: protects memory
    max_pdu_accept: int = Field(16 * 2**20, ge=4096)

    @field_validator("calling_ae_allowlist", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return tuple(x for x in v.split(",") if x) if isinstance(v, str) else v


class HttpSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    drain_timeout: float = Field(20.0, gt=0)
    # one INFO line per HTTP request (logger aiohttp.access); off by default: formatting it costs about a
    # fifth of a small request's CPU, and vna_http_requests_total / the latency histograms count requests
    access_log: bool = False
    # a built single-page web viewer (e.g. OHIF's dist/) served same-origin at "/"; None: no viewer
    viewer_dir: Path | None = None

    @field_validator("viewer_dir")
    @classmethod
    def _viewer(cls, v: Path | None) -> Path | None:
        if v is not None and not (v / "index.html").is_file():
            raise ValueError(f"{v} has no index.html (give the viewer's built dist/ directory)")
        return v


class DicomwebSettings(_Section):
    root: str = "/dicomweb"
    # scheme://host[:port][/prefix] clients reach us by, for BulkDataURIs and RetrieveURLs behind a proxy;
    # None: built from each request's scheme, Host header and the root
    public_base_url: str | None = None
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ("*",)
    max_stow_bytes: int = Field(4 * 2**30, ge=1024)
    # STOW-RS parts larger than this are written to a temporary file while they arrive
    stow_spill_bytes: int = Field(8 * 2**20, ge=1024)
    # parts of one STOW-RS request stored at once, each held whole in memory while it is stored, together
    # at most stow_parallel_bytes (a larger part is stored alone): the fsyncs of their objects overlap, and
    # parts written meanwhile are indexed together (group commit, archive/index.py)
    stow_parallel_parts: int = Field(16, ge=1, le=64)
    stow_parallel_bytes: int = Field(64 * 2**20, ge=1024)
    allow_delete: bool = True

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        return "/" + v.strip("/") if v.strip("/") else ""

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return tuple(x for x in v.split(",") if x) if isinstance(v, str) else v


class DatabaseSettings(_Section):
    url: str | None = None  # None: the embedded PostgreSQL under data_dir
    pool_min: int = Field(2, ge=1)
    pool_max: int = Field(16, ge=1)
    command_timeout: float = Field(30.0, gt=0)


class StorageBackend(str, Enum):
    filesystem = "filesystem"
    rados = "rados"


class RadosSettings(_Section):
    """Where and how the RADOS store connects (storage.backend: rados)."""

    conffile: Path | None = None  # None: $CEPH_CONF, else /etc/ceph/ceph.conf (librados' own search)
    keyring: Path | None = None   # None: the keyring the conffile names (or librados' default places)
    client_name: str = "client.admin"
    pool: str = "vna"
    # objects larger than this are split in parts; each RADOS object must stay under osd_max_object_size (128 MiB)
    part_size: int = Field(32 * 2**20, ge=64 * 2**10, le=128 * 2**20)
    # every librados call (monitor and OSD) fails after this many seconds (whole: librados' unit) instead of
    # waiting for the cluster
    op_timeout: int = Field(30, ge=1)
    # where this client is in the CRUSH tree, e.g. "datacenter=dc-b host=h3" (librados' crush_location);
    # None: as ceph.conf says (unset: nowhere in particular)
    crush_location: str | None = None
    # read from the copy nearest to crush_location instead of the primary (archive/rados_local.py)
    localize_reads: bool = False

    @field_validator("client_name")
    @classmethod
    def _client(cls, v: str) -> str:
        if not v.startswith("client.") or len(v) == len("client."):
            raise ValueError(f"{v!r} is not a Ceph client name (client.<id>)")
        return v

    @field_validator("pool")
    @classmethod
    def _pool(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError(f"{v!r} is not a usable pool name (not empty, no '/')")
        return v


class MoveSettings(_Section):
    """Moves between storage classes (archive/moves.py): `vna policy apply`, and periodically in `vna serve`."""

    interval_seconds: float = Field(0.0, ge=0)  # a server applies the policy this often; 0: only `vna policy apply`
    rate_mb_per_s: float = Field(0.0, ge=0)     # copy throttle in MB/s (10^6 bytes); 0: as fast as it goes
    # an old copy is deleted this long after the index names the new one (a reader that located the old
    # copy just before the switch still reads it)
    grace_seconds: float = Field(60.0, ge=0)
    concurrency: int = Field(8, ge=1, le=256)   # objects copied at once


class DigestAlgorithm(str, Enum):
    """The digest of each new object (archive/digest.py); existing objects keep the one they were written with."""

    blake3 = "blake3"  # the default: about 4x faster than SHA-256 here
    sha256 = "sha256"  # FIPS 180-4


class StorageSettings(_Section):
    backend: StorageBackend = StorageBackend.filesystem
    root: Path | None = None  # None: <data_dir>/objects
    fsync: bool = True
    digest: DigestAlgorithm = DigestAlgorithm.blake3
    # filesystem: objects up to this size are written into preallocated segment files rather than into a file
    # each (archive/segments.py); 0: a file per object
    pack_max_bytes: int = Field(16 << 20, ge=0)
    segment_bytes: int = Field(256 << 20, ge=1 << 20)  # the largest segment (a writer's first is 16 MiB)
    rados: RadosSettings = RadosSettings()
    # storage classes and the rules that choose them (archive/policy.py); None: one class "default" on the
    # configured pool (rados.pool) or the root. Read at start and again on SIGHUP.
    policy_file: Path | None = None
    moves: MoveSettings = MoveSettings()


class EventLoop(str, Enum):
    uvloop = "uvloop"    # libuv's loop: sockets, timers and callbacks in C (WADO-RS +26 %, docs/performance.md)
    asyncio = "asyncio"  # the standard library's selector loop


class DuplicatePolicy(str, Enum):
    reject = "reject"
    keep_newest = "keep-newest"


class IngestSettings(_Section):
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.reject
    max_instance_bytes: int = Field(2 * 2**30, ge=1024)
    # an object written but never indexed (a crash between the two) is removed after this age
    orphan_grace_seconds: float = Field(600.0, ge=0)


class Settings(BaseSettings):
    """Everything configurable. Frozen: build it once with `Settings.load` and pass it down."""

    model_config = SettingsConfigDict(env_prefix="VNA__", env_nested_delimiter="__", frozen=True,
                                      extra="forbid", case_sensitive=False)

    data_dir: Path = Path(".data")
    ae_title: str = "VNA"
    log_level: str = "INFO"
    event_loop: EventLoop = EventLoop.uvloop
    # threads for blocking calls (file writes and their fsyncs, librados, pydicom): the event loop's default
    # executor. Most of their time is spent waiting on the device, so more than the CPUs.
    io_threads: int = Field(16, ge=1, le=256)
    # processes serving connections (gateway/workers.py), each with its own event loop: one Python process
    # uses about one core. 0: one per CPU this process may use (affinity and cgroup quota), at most 8 (each
    # has its own database pool); 1: no workers, the serving process itself listens. Limits such as
    # dicom.max_associations and database.pool_max apply per worker.
    workers: int = Field(0, ge=0, le=64)
    # pin worker i (and its threads) to the i-th CPU of the process's affinity, when there are exactly as
    # many workers as CPUs in it: a dedicated machine, or a pod given whole CPUs (static CPU manager). Never on
    # a wider set, which other pods share. STOW-RS +10 % here (docs/performance.md).
    worker_cpu_affinity: bool = True
    dicom: DicomSettings = DicomSettings()
    http: HttpSettings = HttpSettings()
    dicomweb: DicomwebSettings = DicomwebSettings()
    database: DatabaseSettings = DatabaseSettings()
    storage: StorageSettings = StorageSettings()
    ingest: IngestSettings = IngestSettings()

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        return validate_ae_title(v)

    @property
    def object_root(self) -> Path:
        return self.storage.root or self.data_dir / "objects"

    @classmethod
    def load(cls, overrides: dict[str, Any] | None = None, config_file: Path | None = None) -> "Settings":
        """Merge flags (`overrides`, nested dicts), environment and file; raise ConfigError if invalid."""
        file_data = _read_config_file(config_file) if config_file else {}

        class _Loaded(cls):  # type: ignore[valid-type, misc]
            @classmethod
            def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                           init_settings: PydanticBaseSettingsSource,
                                           env_settings: PydanticBaseSettingsSource,
                                           dotenv_settings: PydanticBaseSettingsSource,
                                           file_secret_settings: PydanticBaseSettingsSource,
                                           ) -> tuple[PydanticBaseSettingsSource, ...]:
                return init_settings, env_settings, InitSettingsSource(settings_cls, file_data)

        try:
            loaded = _Loaded(**(overrides or {}))
        except SettingsError as exc:
            raise ConfigError(f"invalid configuration in the environment: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid configuration: {problems}") from exc
        return loaded


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = tomllib.loads(text) if str(path).endswith(".toml") else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {'TOML' if str(path).endswith('.toml') else 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data
