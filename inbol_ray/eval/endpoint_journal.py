"""An endpoint model's answers kept between runs, keyed by what produced them.

Why keyed: the journal lets a rerun ask only what has no answer yet, and keyed by item id alone a rerun
under the same `--name` against another model or endpoint, or with other prompts or decoding, reported the
old model's answers as "answered before". So a journal lives under the fingerprint of everything an answer
depends on besides the item (`endpoint_key`: the backend, the base URL, and the request's every field but
its messages, which are the endpoint's model and the decoding: temperature, max_tokens, ...; and the
prompt section), with a `key.json` saying what the fingerprint is of. And each answer carries the digest
of its exact request, rendered text and image included, so an item whose text or image changed under the
same id (a re-prepared run) is asked again rather than answered by what was asked before.

    <run>/eval/endpoint/<name>/<fingerprint>/key.json
    <run>/eval/endpoint/<name>/<fingerprint>/answers/<item digest>.json

A change starts a fresh journal beside the old ones, which stay where they are and are never read: nothing
mixes, and going back (the endpoint's model `a`, then `b`, then `a` again) reuses `a`'s answers. Journals
of the layout before fingerprints (`<name>/answers/`) say nothing of what produced them and are never read
either: one more round of questions, once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pyarrow.fs as pafs

from inbol_ray.data import io as dio
from inbol_ray.manifest import fingerprint


def endpoint_key(base_url: str, request: dict[str, Any], prompt: Any) -> dict[str, Any]:
    """Everything an endpoint's answer depends on besides the item: which server, which model, asked how.
    `request`: one chat request (its messages are the item's and are left out); `prompt`: `cfg.prompt`."""
    return {
        "backend": "endpoint",
        "base_url": base_url.rstrip("/"),
        "request": {k: v for k, v in request.items() if k != "messages"},
        "prompt": dataclasses.asdict(prompt),
    }


def request_digest(body: dict[str, Any]) -> str:
    """One request exactly as sent (its text and image included)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class Journal:
    """Answers stored one file per item as they arrive (atomic writes: a crash never leaves half a file),
    in the folder of their key under the model's endpoint folder."""

    def __init__(self, folder: str, key: dict[str, Any]) -> None:
        self.parent, self.key = folder, key
        self.fingerprint = fingerprint(key)
        self.folder = dio.join(folder, self.fingerprint)
        self._stamped = False

    def _file(self, item_id: str) -> str:
        return dio.join(self.folder, "answers", hashlib.sha1(item_id.encode()).hexdigest()[:20] + ".json")

    def answered(self, requests: dict[str, str]) -> dict[str, str]:
        """The answers recorded for exactly these requests (item id -> `request_digest`): item id ->
        response."""
        answers = dio.join(self.folder, "answers")
        if not dio.exists(answers):
            return {}
        out = {}
        for uri in dio.list_files(answers, suffix=".json"):
            record = json.loads(dio.read_bytes(uri).decode())
            if requests.get(record["id"]) == record.get("request"):
                out[record["id"]] = record["response"]
        return out

    def record(self, item_id: str, request: str, response: str) -> None:
        if not self._stamped:
            dio.write_bytes(dio.join(self.folder, "key.json"), json.dumps(self.key, indent=1).encode())
            self._stamped = True
        body = {"id": item_id, "request": request, "response": response}
        dio.write_bytes(self._file(item_id), json.dumps(body).encode())

    def others(self) -> list[str]:
        """The model's other journals (other keys, and the unkeyed `answers/` of before): left unread."""
        fs, path = dio.resolve(self.parent)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(
            i.base_name
            for i in infos
            if i.type == pafs.FileType.Directory and i.base_name != self.fingerprint
        )
