"""`TokenDataset`: the StreamingDataset of FlexBERT's MDS shards, whose read errors name the
shard and sample (a decoding error, a shard its background thread could not prepare), and the
check of a local shard folder against its index.json before the library opens it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streaming import StreamingDataset

from flexbert.data.errors import DataError, DataFileNotFoundError
from flexbert.data.streaming_lifecycle import track


def check_local_index(local: str | Path) -> None:
    index = Path(local) / "index.json"
    if not index.exists():
        raise DataFileNotFoundError(f"MDS index not found: {index} (run `flexbert-data prepare`)")
    try:
        obj = json.loads(index.read_text())
        shards = obj["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{index}: corrupt MDS index ({e})") from e
    for shard in shards:
        zipped, raw = ((shard.get(k) or {}).get("basename") for k in ("zip_data", "raw_data"))
        if zipped and not (Path(local) / zipped).exists():
            # with only the decompressed copy left, the streaming library deletes it on open
            left = f" (only its decompressed {raw} is here)" if (Path(local) / raw).exists() else ""
            raise DataFileNotFoundError(
                f"{local}: shard {zipped} listed in index.json is missing{left}; restore it or "
                "re-run `flexbert-data prepare --overwrite`"
            )
        if not zipped and raw and not (Path(local) / raw).exists():
            raise DataFileNotFoundError(f"{local}: shard {raw} listed in index.json is missing")


class TokenDataset(StreamingDataset):
    """StreamingDataset of `{"input_ids": np.ndarray, "index": int}` documents.

    The global sample index travels with each document so a packer's buffer can be saved as a
    list of indices and rebuilt by random access on resumption.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        track(self)  # for stop_streaming: its threads and shared memory end with the run

    def on_exception(self, future: Any) -> None:
        """The streaming library's callback for its download/decompress threads: remember
        what failed, so the iteration it cut short raises (see `__iter__`)."""
        error = future.exception()
        if error is not None:
            self._thread_error = error
        super().on_exception(future)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The library's iteration, except that a shard its background thread could not
        prepare (download, decompress) is a DataError naming it, not a quiet early end of the
        epoch (a checkpoint taken then would skip the rest of the epoch for good)."""
        self._thread_error: BaseException | None = None
        try:
            yield from super().__iter__()
        except DataError:
            raise
        except RuntimeError as err:
            if self._thread_error is None:
                raise
            raise self._shard_error() from err
        if self._thread_error is not None:
            raise self._shard_error()

    def _shard_error(self) -> DataError:
        if hasattr(self, "_iterator"):  # end the epoch's other thread, as the library does
            self._iterator.exit()
        error = self._thread_error
        shard = _failing_shard(error)
        where = f"shard {shard}" if shard else f"a shard of {[s.local for s in self.streams]}"
        return DataError(
            f"cannot prepare {where} while reading it: {type(error).__name__}: {error}; "
            "the epoch stopped there. Restore the shard or re-run `flexbert-data prepare "
            "--overwrite`"
        )

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        try:
            sample = super().get_item(sample_id, retry)
        except Exception as e:  # noqa: BLE001 - decompression / decoding errors of many types
            raise DataError(
                f"cannot read sample {sample_id} from {self.local_of(sample_id)}: {e}"
            ) from e
        if "input_ids" not in sample:
            raise DataError(f"MDS samples lack an 'input_ids' column (got {sorted(sample)})")
        return {"input_ids": sample["input_ids"], "index": int(sample_id)}

    def local_of(self, sample_id: int) -> str:
        """The local directory of the stream a sample comes from."""
        return self.streams[self.stream_of(sample_id)].local

    def stream_of(self, sample_id: int) -> int:
        """Index (in the configured order) of the stream a sample comes from."""
        shard_id, _ = self.spanner[sample_id]
        return int(self.stream_per_shard[shard_id])


def _failing_shard(error: BaseException | None) -> str | None:
    """The shard file a background thread was preparing when `error` was raised (from the
    traceback's frames: the library's errors do not name it), or None."""
    tb = error.__traceback__ if error is not None else None
    shard = None
    while tb is not None:
        names = tb.tb_frame.f_locals
        for key in ("zip_filename", "raw_filename", "filename"):
            if isinstance(names.get(key), str):
                shard = names[key]
                break
        tb = tb.tb_next
    return shard
