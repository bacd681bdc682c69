"""Secret randomness for DP-SGD: the noise and the Poisson sampling nobody can replay.

DP-SGD's guarantee assumes the adversary does not know the noise added to the gradients nor which
examples each step sampled. A run whose noise and sampling follow from a seed written in its run
record gives that guarantee away to whoever holds the record (and, as DP assumes, the rest of the
training data): they can regenerate both and remove the noise. By default memlens therefore:

* draws a **256-bit key from the operating system** (``secrets.token_bytes``) when a DP run starts;
  it is never written to run.json, audit.json, reports or logs, only to the run's resumable
  checkpoint (deleted when training ends) so an interrupted run resumes with the same streams;
* **re-keys every logical step**: the step's Poisson sample and its noise come from two PyTorch
  generators seeded with 63 bits of HMAC-SHA256(key, purpose, epoch, step). PyTorch's generators
  (Mersenne Twister on the CPU, Philox on CUDA) are not cryptographic: enough consecutive outputs
  reveal their state. Each one here draws for a single step only, so even a whole step's draws
  reveal that step's seed and nothing of the other steps (HMAC outputs are unpredictable without
  the key), and the released model exposes no raw draw at all;
* adds the noise as the mean of four Gaussian draws scaled to the same variance, after discarding
  one draw (Holohan and Braghin, "Secure Random Sampling in Differential Privacy", ESORICS 2021,
  Section 5.1): the defence Opacus's ``secure_mode`` uses against floating-point attacks on
  Gaussian sampling (Mironov 2012; Haney et al. 2022). Opacus's secure mode draws from torchcsprng,
  a cryptographic generator no longer maintained; memlens keeps PyTorch's generators, keyed per
  step as above, and pays four Gaussian draws per parameter per step (negligible against the
  backward pass).

**Coupled pairs.** f and g of one seed (references 2j and 2j+1) share their DP noise and sampling
(``coupling: shared``): each expectation stays unbiased and their difference loses the variance
two independent runs would add. Only a command that trains both sides (``memlens sweep``, ``memlens
run``) couples them: it writes the pair's key to a file beside the run directories (mode 0600)
right before the pair trains, hands its path to both runs, and deletes it as soon as both have
finished; an interrupted pair keeps it until the resumed pair completes. A run trained on its own
(``memlens train``) draws its own key and writes none: two runs of one side never share noise, and
no key outlives its run's checkpoint. Each run records what it actually did (``coupling``: shared
or independent) and an identifier of its key (``key_id``, an HMAC of the key: equal for the two
sides of a coupled pair, and revealing nothing of the key), so an audit can check the coupling.
A coupled pair is not two independent DP releases: whoever holds both models holds two releases
made with the same noise; each model alone keeps its (epsilon, delta).

``dp.reproducible: true`` keeps the seeded behaviour (a rerun gives the same model); the run record
says so, and the report, the model card and ``memlens privacy`` state that the guarantee then
holds only while the run record stays private.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import torch

from memlens.errors import MemlensError
from memlens.io import sha256_json

PAIR_PREFIX = ".memlens-dp-secret-"


def pair_secret_path(where: Path, pair_id: str) -> Path:
    return Path(where) / f"{PAIR_PREFIX}{pair_id}"


def new_key() -> bytes:
    return secrets.token_bytes(32)


class SecretStreams:
    """Per-step generators derived from a secret key (see the module docstring)."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("a DP secret key has at least 128 bits")
        self._key = bytes(key)

    def seed(self, purpose: str, epoch: int, step: int) -> int:
        mac = hmac.new(self._key, f"{purpose}/{epoch}/{step}".encode(), hashlib.sha256).digest()
        return int.from_bytes(mac[:8], "little") >> 1

    def generator(self, purpose: str, epoch: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed(purpose, epoch, step))

    def hex(self) -> str:
        """For the resumable checkpoint only."""
        return self._key.hex()

    def __repr__(self) -> str:  # never print the key
        return "SecretStreams(<secret>)"


def secure_normal(std: float, size: int, *, generator: torch.Generator, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """N(0, std^2) as the sum of four N(0, std^2) draws divided by 2, after discarding one draw (the
    Holohan-Braghin construction Opacus's secure mode uses). Shape (size,)."""
    torch.normal(0.0, std, (1,), generator=generator, dtype=dtype, device=device)
    total = torch.normal(0.0, std, (size,), generator=generator, dtype=dtype, device=device)
    for _ in range(3):
        total += torch.normal(0.0, std, (size,), generator=generator, dtype=dtype, device=device)
    return total.div_(2.0)


# ----------------------------------------------------------------------------- pair secrets


def key_id(key: bytes) -> str:
    """A public identifier of a key: equal for runs that share it, and revealing nothing of it."""
    return hmac.new(bytes(key), b"memlens-dp-key-id", hashlib.sha256).hexdigest()[:16]


def pair_of(config) -> tuple[str, str] | None:
    """(pair id, this run's side) of a coupled DP run, None for a run without a partner.

    f and g of one seed, and references 2j and 2j+1, are partners: the same recipe and seed, trained
    on complementary data. The id is a digest of what they share, so the two find the same file."""

    dp = config.dp
    if dp is None or dp.reproducible or dp.coupling != "shared":
        return None
    if config.reference is not None:
        side = str(config.reference.index % 2)
        pair = config.reference.index // 2
    elif config.subsets in ("f", "g"):
        side, pair = config.subsets, 0
    else:
        return None
    shared = config.model_dump(mode="json", exclude={"subsets", "device", "precision", "workers", "threads"})
    if shared.get("reference"):
        shared["reference"].pop("index", None)
    return sha256_json({"recipe": shared, "pair": pair})[:24], side


def create_pair_secret(where: Path, pair_id: str) -> Path:
    """The pair's key file (mode 0600), created with a fresh OS key unless it exists (a resumed pair)."""
    path = pair_secret_path(where, pair_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    try:
        os.write(fd, new_key())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_pair_secret(path: Path) -> bytes:
    """The key of a pair-secret file (refusing one that is readable by others or too short)."""

    try:
        st = os.stat(path)
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MemlensError(f"the pair's DP secret {path} cannot be read ({exc.strerror})") from None
    if st.st_mode & 0o077:
        raise MemlensError(f"the pair's DP secret {path} is readable by others (mode {st.st_mode & 0o777:o}); it must "
                           f"be 0600")
    if len(data) < 32:
        raise MemlensError(f"{path} is not a memlens pair secret (too short)")
    return data[:32]


def delete_pair_secret(path: Path) -> None:
    """Overwrite, then delete (best effort: the file system may keep old blocks)."""
    path = Path(path)
    try:
        with open(path, "r+b") as fh:
            fh.write(b"\0" * max(32, os.fstat(fh.fileno()).st_size))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        pass
    path.unlink(missing_ok=True)
