"""The start-of-run check that every rank shares the run's storage (docs/scaling.md).

The run directory and the checkpoint root must be one place for all ranks: a filesystem every
node mounts (NFS, Lustre...) or an object store (``s3://``...). A relative path, or a local
disk, on several nodes gives each node its own directory: checkpoints split across nodes that
no rank can resume from. So before training, rank 0 writes a nonce under each of them and every
rank must read it back; the prepared data must be the same version on every rank. A node that
cannot is refused on every rank in one line naming the path and the node, within seconds.
"""

from __future__ import annotations

import socket
import uuid

from mqsa_core.collectives import all_gather_objects, barrier
from mqsa_core.config import Config
from mqsa_core.errors import UserError
from mqsa_core.prepared import read_stats
from mqsa_core.storage import atomic_write_bytes, url_to_fs
from trainer.runtime.distributed import DistEnv

NONCE_FILE = ".mqsa-ted-shared-check"


class NotShared(UserError):
    """A rank cannot see the storage rank 0 writes to (raised on every rank alike)."""

    every_rank = True  # one line per node is enough: the launcher prints local rank 0's


def _reads_back(url: str, nonce: str) -> bool:
    fs, path = url_to_fs(f"{url.rstrip('/')}/{NONCE_FILE}")
    try:
        with fs.open(path, "r") as f:
            return f.read() == nonce
    except (OSError, ValueError, UserError):
        return False


def _data_version(cfg: Config) -> str:
    try:
        return str(read_stats(cfg.data.dir).get("version"))
    except (OSError, ValueError, UserError) as e:
        return f"unreadable ({type(e).__name__})"


def check_shared_storage(cfg: Config, env: DistEnv) -> None:
    """Refuse the run on every rank unless every rank reads what rank 0 wrote under
    ``train.run_dir`` (and ``checkpoint.dir`` when set) and sees the same prepared data
    version (collective)."""
    places = {"train.run_dir": cfg.train.run_dir}
    if cfg.checkpoint.dir:
        places["checkpoint.dir"] = cfg.checkpoint.dir
    nonce = all_gather_objects(uuid.uuid4().hex if env.is_main else None)[0]
    if env.is_main:
        for url in places.values():
            atomic_write_bytes(f"{url.rstrip('/')}/{NONCE_FILE}", nonce.encode())
    barrier()
    unseen = [key for key, url in places.items() if not _reads_back(url, nonce)]
    views = all_gather_objects((socket.gethostname(), unseen, _data_version(cfg)))
    barrier()
    if env.is_main:
        for url in places.values():
            fs, path = url_to_fs(f"{url.rstrip('/')}/{NONCE_FILE}")
            fs.rm(path)
    host0 = views[0][0]
    for key, url in places.items():
        blind = [(rank, host) for rank, (host, keys, _) in enumerate(views) if key in keys]
        if blind:
            who = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
            raise NotShared(
                f"{key}={url} is not shared storage: {who} cannot read what rank 0 on {host0} "
                "wrote there. Put the run directory and checkpoints on a filesystem every node "
                "mounts, or an object store (s3://, gs://...), with an absolute path or URL "
                "(docs/scaling.md, what must be shared)"
            )
    versions = {version for _, _, version in views}
    if len(versions) > 1:
        seen = "; ".join(f"rank {r} on {host}: {v}" for r, (host, _, v) in enumerate(views))
        raise NotShared(
            f"data.dir={cfg.data.dir} is not the same prepared data on every rank ({seen}): "
            "every node must read one prepared output (shared storage, or identical copies)"
        )
