"""The trained-model artifact: one directory, open formats, versioned and hashed.

Layout of an artifact directory::

    manifest.json          format version, activation, flux unit, wavelengths, training
                           config, data summary, code version, file checksums, components,
                           content hash
    model.npz              network weights and biases (``layers/<i>/W``, ``layers/<i>/b``),
                           ``ln_R``, ``scaler/mean``, ``scaler/scale``, ``gmm/*``
    component-<name>.npz   extra parts (e.g. the confidence classifiers), see :func:`add_component`

The content hash is the sha256 of the canonical JSON of the manifest without
the hash itself; the manifest holds each file's sha256, so the hash covers
every array. Loading recomputes both and refuses a corrupt or mismatched
artifact with :class:`xpcat.errors.InputError`. No pickle anywhere
(``np.load(..., allow_pickle=False)``).

Other files in the directory (training checkpoints, loss curves) are not part
of the artifact and are ignored by :func:`load_artifact`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xpcat.errors import InputError
from xpcat.fileio import file_sha256, package_version, write_bytes_atomic, write_text_atomic
from xpcat.model.forward import ForwardModel
from xpcat.model.prior import GMMParams, gmm_from_arrays, gmm_to_arrays

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_FORMAT_VERSION",
    "MANIFEST",
    "MODEL_FILE",
    "ArtifactError",
    "ModelArtifact",
    "add_component",
    "artifact_exists",
    "load_artifact",
    "save_artifact",
]

logger = logging.getLogger(__name__)

#: Name of the artifact format (checked on load).
ARTIFACT_FORMAT = "xpcat-model"
#: Version of the artifact layout; loading refuses a different major version.
ARTIFACT_FORMAT_VERSION = "1.0"
MANIFEST = "manifest.json"
MODEL_FILE = "model.npz"
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class ArtifactError(InputError):
    """A model artifact is missing, corrupt, of another format version, or inconsistent."""


@dataclass
class ModelArtifact:
    """A loaded model artifact.

    Attributes
    ----------
    path : the artifact directory.
    params : model pytree (numpy float arrays) ``{"layers": [{"W", "b"}, ...], "ln_R": (66,)}``.
    scaler : ``{"mean": (3,), "scale": (3,)}`` input standardisation.
    activation : hidden-layer activation name.
    gmm : the type prior.
    flux_unit : the internal flux unit in W m^-2 nm^-1 (1e-18).
    wavelengths : (66,) effective wavelengths in nm of the model outputs.
    content_hash : sha256 hex digest identifying the artifact.
    config : the resolved run configuration used for training (nested dicts).
    data_summary : counts of the training set (cuts, split, self-cleaning).
    code_version : xpcat version that wrote it.
    components : name -> dict of numpy arrays (e.g. ``"confidence"``).
    component_meta : name -> JSON metadata of that component.
    """

    path: Path
    params: dict[str, Any]
    scaler: dict[str, np.ndarray]
    activation: str
    gmm: GMMParams
    flux_unit: float
    wavelengths: np.ndarray
    content_hash: str
    config: dict[str, Any]
    data_summary: dict[str, Any]
    code_version: str
    components: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    component_meta: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def R(self) -> np.ndarray:
        """(66,) extinction curve per unit E."""
        return np.exp(self.params["ln_R"])

    def forward_model(self, dtype: Any = np.float32) -> ForwardModel:
        """The forward model as a :class:`~xpcat.model.forward.ForwardModel` (JAX arrays of ``dtype``)."""
        import jax
        import jax.numpy as jnp

        cast = lambda x: jnp.asarray(x, dtype=dtype)  # noqa: E731
        return ForwardModel(jax.tree_util.tree_map(cast, self.params), {k: cast(v) for k, v in self.scaler.items()},
                            self.activation)


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write an uncompressed npz atomically; returns its sha256."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    write_bytes_atomic(path, buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> str:
    manifest["content_hash"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False))
    return manifest["content_hash"]


def _params_to_arrays(params: dict[str, Any], scaler: dict[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(params["layers"]):
        out[f"layers/{i}/W"] = np.asarray(layer["W"])
        out[f"layers/{i}/b"] = np.asarray(layer["b"])
    out["ln_R"] = np.asarray(params["ln_R"])
    out["scaler/mean"] = np.asarray(scaler["mean"])
    out["scaler/scale"] = np.asarray(scaler["scale"])
    return out


def save_artifact(
    path: str | Path,
    *,
    params: dict[str, Any],
    scaler: dict[str, Any],
    activation: str,
    gmm: GMMParams,
    wavelengths: np.ndarray,
    flux_unit: float,
    config: dict[str, Any] | None = None,
    data_summary: dict[str, Any] | None = None,
) -> str:
    """Write a model artifact into directory ``path`` (created if needed).

    Components already present in an earlier artifact at ``path`` are dropped
    (they belong to the old model).

    Parameters
    ----------
    params, scaler, activation : the forward model (see :mod:`xpcat.model.forward`).
    gmm : the fitted type prior.
    wavelengths : (66,) nm, effective wavelength of each output.
    flux_unit : float, the internal flux unit in W m^-2 nm^-1.
    config : resolved run configuration (JSON-able nested dicts).
    data_summary : counts of the training set.

    Returns
    -------
    content_hash : str (sha256 hex).
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    n_out = np.asarray(params["ln_R"]).shape[0]
    wl = np.asarray(wavelengths, dtype=np.float64)
    if wl.shape != (n_out,):
        raise ArtifactError(f"wavelengths must have shape ({n_out},), got {wl.shape}")
    arrays = _params_to_arrays(params, scaler)
    arrays.update(gmm_to_arrays(gmm))
    for k, v in arrays.items():
        if not np.all(np.isfinite(v)):
            raise ArtifactError(f"refusing to save a model with non-finite values in {k!r}")
    old = directory / MANIFEST
    if old.exists():
        old.unlink()  # invalidate first: a crash below leaves no artifact rather than a mixed one
    for stale in directory.glob("component-*.npz"):
        stale.unlink()
    sha = _write_npz(directory / MODEL_FILE, arrays)
    manifest = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_FORMAT_VERSION,
        "code_version": package_version("xpcat"),
        "activation": activation,
        "n_layers": len(params["layers"]),
        "flux_unit_w_m2_nm": float(flux_unit),
        "wavelengths_nm": wl.tolist(),
        "config": _jsonable(config or {}),
        "data_summary": _jsonable(data_summary or {}),
        "files": {MODEL_FILE: sha},
        "components": {},
    }
    h = _write_manifest(directory, manifest)
    logger.info("model artifact written to %s (content hash %s)", directory, h[:12])
    return h


def _read_manifest(directory: Path) -> dict[str, Any]:
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{directory} is not a model artifact: {MANIFEST} is missing (run `xpcat train` first)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{mpath}: corrupt manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{mpath}: not an {ARTIFACT_FORMAT} manifest (format={manifest.get('format')!r})"
                            if isinstance(manifest, dict) else f"{mpath}: not a JSON object")
    version = str(manifest.get("format_version", ""))
    if version.split(".")[0] != ARTIFACT_FORMAT_VERSION.split(".")[0]:
        raise ArtifactError(f"{directory}: artifact format version {version!r} is not supported by this xpcat "
                            f"(expects {ARTIFACT_FORMAT_VERSION}); retrain with `xpcat train`")
    expected = hashlib.sha256(_canonical(manifest)).hexdigest()
    if manifest.get("content_hash") != expected:
        raise ArtifactError(f"{mpath}: content hash mismatch (manifest says {manifest.get('content_hash')!r}, "
                            f"contents give {expected!r}); the artifact was edited or is corrupt")
    return manifest


def _load_npz(directory: Path, name: str, sha: str) -> dict[str, np.ndarray]:
    p = directory / name
    if not p.is_file():
        raise ArtifactError(f"{directory}: artifact file {name} is missing")
    got = file_sha256(p)
    if got != sha:
        raise ArtifactError(f"{p}: checksum mismatch (expected {sha[:12]}..., got {got[:12]}...); the file is corrupt")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ArtifactError(f"{p}: cannot read arrays ({err})") from err


def load_artifact(path: str | Path) -> ModelArtifact:
    """Load and verify a model artifact.

    Raises
    ------
    ArtifactError (an :class:`xpcat.errors.InputError`)
        If the directory is not an artifact, its format version is unsupported,
        a file is missing or its checksum or the content hash does not match.
    """
    directory = Path(path)
    manifest = _read_manifest(directory)
    files = manifest.get("files", {})
    if MODEL_FILE not in files:
        raise ArtifactError(f"{directory}: manifest lists no {MODEL_FILE}")
    arrays = _load_npz(directory, MODEL_FILE, files[MODEL_FILE])
    try:
        n_layers = int(manifest["n_layers"])
        params = {
            "layers": [{"W": arrays[f"layers/{i}/W"], "b": arrays[f"layers/{i}/b"]} for i in range(n_layers)],
            "ln_R": arrays["ln_R"],
        }
        scaler = {"mean": arrays["scaler/mean"], "scale": arrays["scaler/scale"]}
        gmm = gmm_from_arrays(arrays)
    except KeyError as err:
        raise ArtifactError(f"{directory / MODEL_FILE}: array {err} is missing") from err
    wl = np.asarray(manifest["wavelengths_nm"], dtype=np.float64)
    if wl.shape != params["ln_R"].shape or params["layers"][-1]["W"].shape[1] != wl.shape[0]:
        raise ArtifactError(f"{directory}: {wl.shape[0]} wavelengths but the network has "
                            f"{params['layers'][-1]['W'].shape[1]} outputs and R has {params['ln_R'].shape[0]}")
    components, cmeta = {}, {}
    for name, info in manifest.get("components", {}).items():
        components[name] = _load_npz(directory, info["file"], info["sha256"])
        cmeta[name] = info.get("meta", {})
    return ModelArtifact(
        path=directory,
        params=params,
        scaler=scaler,
        activation=manifest["activation"],
        gmm=gmm,
        flux_unit=float(manifest["flux_unit_w_m2_nm"]),
        wavelengths=wl,
        content_hash=manifest["content_hash"],
        config=manifest.get("config", {}),
        data_summary=manifest.get("data_summary", {}),
        code_version=manifest.get("code_version", "unknown"),
        components=components,
        component_meta=cmeta,
    )


def add_component(path: str | Path, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """Store an extra part (e.g. the confidence classifiers) in an existing artifact.

    Replaces a component of the same name. The manifest (and so the content
    hash) changes.

    Parameters
    ----------
    path : artifact directory (must verify).
    name : component name (letters, digits, ``_ . -``).
    arrays : name -> numpy array (no object arrays).
    meta : JSON-able metadata.

    Returns
    -------
    The new content hash.
    """
    directory = Path(path)
    if not _COMPONENT_NAME.match(name):
        raise ArtifactError(f"component name {name!r} must match {_COMPONENT_NAME.pattern}")
    manifest = _read_manifest(directory)
    clean = {}
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype == object:
            raise ArtifactError(f"component {name!r}: array {k!r} has dtype object; only numeric arrays are stored")
        clean[k] = a
    fname = f"component-{name}.npz"
    sha = _write_npz(directory / fname, clean)
    manifest.setdefault("components", {})[name] = {"file": fname, "sha256": sha, "meta": _jsonable(meta)}
    manifest["files"][fname] = sha
    h = _write_manifest(directory, manifest)
    logger.info("component %r added to %s (content hash %s)", name, directory, h[:12])
    return h


def artifact_exists(path: str | Path) -> bool:
    """True when ``path`` holds a manifest that verifies (cheap: does not hash the arrays)."""
    try:
        _read_manifest(Path(path))
    except ArtifactError:
        return False
    return True
