"""Repositories as earlier versions wrote them: format 2 (JSON index files) and, before
name-bound metadata, format 1 – made
from the format as docs/repository.md describes it – not with this version's code – so
that the tests prove such repositories still open:

    config      JSON without "mac", "version": 1
    keys/<id>   key file version 1: the master key wrapped with associated data
                "agentless-vmbackup master key" (bound to no repository)
    metadata    kind ‖ 0x01 ‖ nonce ‖ AES-256-GCM(zstd(JSON), associated data = kind)
                kind ‖ 0x01 ‖ zstd(JSON) ‖ hash(everything before)      (unencrypted)

Index files are renamed to the id of their new bytes, as the old version named them.
Pack trailers are left as they are (the packs' names are hashes of their bytes).
"""

from __future__ import annotations

import base64
import json
import os

import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agentless.backup.keys import Keys
from agentless.backup.repoconfig import encode_config
from agentless.backup.repository import CONDEMNED_KIND, INDEX_KIND, POINT_KIND, Repository
from agentless.backup.storage import Backend

OLD_KEY_AAD = b"agentless-vmbackup master key"


def seal_format_1(keys: Keys, kind: bytes, document: object) -> bytes:
    body = zstandard.ZstdCompressor().compress(json.dumps(document).encode())
    head = kind + b"\x01"
    if keys.data_key is None:
        return head + body + keys.digest(head + body)
    nonce = os.urandom(12)
    return head + nonce + AESGCM(keys.data_key).encrypt(nonce, body, kind)


def _old_key_file(data: bytes, password: str) -> bytes:
    document = json.loads(data)
    kdf = document["kdf"]
    salt, nonce = (base64.b64decode(document[field]) for field in ("salt", "nonce"))
    kek = Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(password.encode())
    aad = OLD_KEY_AAD + b" of repository " + document.pop("repository").encode()
    master = AESGCM(kek).decrypt(nonce, base64.b64decode(document["data"]), aad)
    document["data"] = base64.b64encode(AESGCM(kek).encrypt(nonce, master, OLD_KEY_AAD)).decode()
    document["version"] = 1
    return json.dumps(document, indent=2).encode() + b"\n"


def json_index(repo: Repository, name: str) -> dict[str, object]:
    """The index file *name* as the JSON document versions before format 3 wrote."""
    packs: dict[str, list[object]] = {}
    for blob, where in repo.read_index_file(name).items():
        packs.setdefault(where.pack, []).append(
            [blob.hex(), where.kind, where.offset, where.length, where.raw_length]
        )
    return {"packs": packs}


def to_format_2(backend: Backend, password: str | None = None) -> None:
    """Rewrite the repository in *backend* (made by this version) as format 2 wrote it:
    JSON index files (format 2 metadata, content-addressed), config version 2."""
    with Repository.open(backend, password) as repo:
        keys = repo.keys
        for name in sorted(backend.list("index/")):
            old = keys.seal_meta(INDEX_KIND, json_index(repo, name), "")
            backend.put(f"index/{keys.blob_id(old).hex()}", old)
            backend.delete(name)
        config = {k: v for k, v in repo.config.items() if k != "mac"} | {"version": 2}
    backend.put("config", encode_config(config, keys))


def to_format_1(backend: Backend, password: str | None = None) -> None:
    """Rewrite the repository in *backend* (made by this version) as format 1."""
    with Repository.open(backend, password) as repo:
        keys = repo.keys
        for name in sorted(backend.list("points/")):
            backend.put(name, seal_format_1(keys, POINT_KIND, repo.read_point(name.split("/")[1]).document()))
        for name in sorted(backend.list("condemned/")):
            document = keys.open_meta(CONDEMNED_KIND, backend.get(name), name)
            backend.put(name, seal_format_1(keys, CONDEMNED_KIND, document))
        for name in sorted(backend.list("index/")):
            old = seal_format_1(keys, INDEX_KIND, json_index(repo, name))
            backend.put(f"index/{keys.blob_id(old).hex()}", old)
            backend.delete(name)
    for name in sorted(backend.list("keys/")):
        assert password is not None
        backend.put(name, _old_key_file(backend.get(name), password))
    config = json.loads(backend.get("config"))
    del config["mac"]
    backend.put("config", json.dumps(config | {"version": 1}, indent=2).encode() + b"\n")
