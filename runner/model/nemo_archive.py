"""A `.nemo` file read without NeMo: its members by name and its config as NeMo's restore_from sees it."""

from __future__ import annotations

import io
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import Any

from runner.errors import InputError

CONFIG, WEIGHTS = "model_config.yaml", "model_weights.ckpt"  # NeMo's SaveRestoreConnector names
_ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip (NeMo before 1.7), bzip2, xz magic numbers


class NemoArchive:
    """The members of a .nemo tar (plain or gzip) by name, `./` prefixes dropped; read on demand."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise InputError(f"{path}: model file not found")
        try:
            with open(path, "rb") as f:
                self.compressed = f.read(6).startswith(_COMPRESSED)
            self.tar = tarfile.open(path, "r:*")
        except _ARCHIVE_ERRORS as exc:
            raise InputError(f"{path}: not a .nemo archive ({exc}); pass a file saved by NeMo's save_to()") from None
        try:
            self.members = {posixpath.normpath(m.name).lstrip("/"): m for m in self.tar.getmembers() if m.isfile()}
        except _ARCHIVE_ERRORS as exc:
            self.tar.close()
            raise InputError(f"{path}: a damaged or truncated .nemo archive ({exc})") from None

    def __enter__(self) -> NemoArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.tar.close()

    def open(self, name: str, missing: str, seekable: bool = False):
        """A file object for member `name`; InputError `<file>: <name> missing: <missing>` when it is absent.
        `seekable`: cheap to seek (torch.load); a compressed archive's member is read into memory for that."""
        member = self.members.get(name)
        if member is None:
            raise InputError(f"{self.path}: {name} missing: {missing}")
        try:
            f = self.tar.extractfile(member)
            return io.BytesIO(f.read()) if seekable and self.compressed else f
        except _ARCHIVE_ERRORS as exc:
            raise InputError(f"{self.path}: {name} unreadable ({exc}); the archive is damaged or truncated") from None

    def read_config(self) -> dict[str, Any]:
        """model_config.yaml as NeMo's restore_from sees it: OmegaConf.load, `model:` unwrapped, interpolations
        resolved (convert_model_config_to_dict_config), Hydra 0.x `cls`/`params` converted (_convert_config)."""
        from omegaconf import OmegaConf  # light; NeMo's own YAML reader (1e-5 is a float, no timestamps)

        f = self.open(CONFIG, "is this a .nemo file?")
        try:
            conf = OmegaConf.load(f)
            conf = conf.model if "model" in conf else conf
            if not OmegaConf.has_resolver("multiply"):
                OmegaConf.register_new_resolver("multiply", lambda x, y: x * y)  # as NeMo's modelPT registers
            config = OmegaConf.to_container(conf, resolve=True)
        except _ARCHIVE_ERRORS as exc:
            raise InputError(f"{self.path}: {CONFIG} unreadable ({exc}); the archive is damaged") from None
        except Exception as exc:  # YAML or interpolation errors
            raise InputError(f"{self.path}: {CONFIG} unreadable: {exc}") from None
        if not isinstance(config, dict):
            raise InputError(f"{self.path}: {CONFIG} is not a mapping")
        _hydra1(config)
        return config


def _hydra1(cfg: dict) -> None:
    """NeMo's model_utils._convert_config: `cls` -> `_target_`, `params` merged into the parent, recursively."""
    if "cls" in cfg and "_target_" not in cfg:
        cfg["_target_"] = cfg.pop("cls")
    if "params" in cfg:
        cfg.update(cfg.pop("params") or {})
    for sub in cfg.values():
        if isinstance(sub, dict):
            _hydra1(sub)
