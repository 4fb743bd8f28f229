"""All server settings in one place, read from the environment (prefix MHR_) or passed in tests.

No settings at all -> the committed demo bundle on CPU (or CUDA when present), port 8000.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_BUNDLE = Path(__file__).resolve().parent.parent / "demo" / "bundle"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MHR_", extra="ignore")

    model: Path = Field(DEMO_BUNDLE / "model", description="folder of a transformers seq2seq or causal LM")
    inventory: Path = Field(DEMO_BUNDLE / "inventory", description="folder of a PEFT Poly / MHR inventory")
    adapted_dir: Path | None = Field(None, description="where adapted tasks live (default <inventory>/adapted)")
    shared_store: bool = Field(False, description="other servers share the adapted folder (a cluster's replicas): "
                               "it is looked at again at a lookup once store_refresh_s has passed, so their new, "
                               "overwritten and deleted tasks are served here too; job records carry an owner and "
                               "a heartbeat")
    store_refresh_s: float = Field(0.25, gt=0, le=60, description="shared_store: how old the last look at the "
                                   "adapted folder may be at a lookup")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, …")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    cache_bytes: int = Field(512 * 2**20, ge=0, description="adapter cache capacity in bytes")
    merge_single_task: bool | None = Field(
        None, description="run a batch whose rows share one task on merged weights (fastest; one extra copy of "
        "the adapted layers' weights). Unset: where the memory plan has room for it; true: start-up fails where "
        "it has not; false: never")
    prepack_weights: bool | None = Field(
        None, description="CPU: run the adapted layers' base matmuls on a oneDNN-packed copy of their weights "
        "(decoding ~15-20 % faster here; one extra copy of those weights). Unset: weights of at least 512 × 512, "
        "where oneDNN is available and the memory plan has room for the copies; true: every adapted layer "
        "(start-up fails where impossible or where they do not fit); false: none")
    memory_fraction: float = Field(0.9, gt=0, le=1, description="the share of the device's memory the plan may "
                                   "use (the rest is headroom for activations and the allocator)")
    memory_limit_bytes: int | None = Field(None, ge=1, description="plan against this much memory instead of the "
                                           "device's (CPU: the cgroup limit or MemTotal; CUDA: the card's total)")
    max_batch_size: int = Field(16, ge=1, le=1024, description="rows decoding together in the serving loop; "
                                "also the adapter row pool's size")
    max_batch_tokens: int = Field(16384, ge=16, description="positions the KV pool holds (every running row's "
                                  "prompt and output, and a seq2seq row's input, in blocks); clamped by the memory "
                                  "plan where they do not fit")
    kv_cache_bytes: int | None = Field(None, ge=1, description="the KV pool's size in bytes (instead of "
                                       "max_batch_tokens positions)")
    gather_joins: bool = Field(True, description="under load (the batch at least half full), rows that could join "
                               "wait up to one prefill's duration for others to join with them, so the loop runs "
                               "fewer prefill forwards; false: every arrival joins at the next iteration")
    kv_block_size: int = Field(16, ge=1, le=1024, description="positions per block of the KV pool")
    prefill_chunk: int | None = Field(512, ge=1, description="a causal LM's prompt longer than this is prefilled "
                                      "this many tokens per iteration, so running rows keep decoding between its "
                                      "chunks (null: at once)")
    prefix_cache: bool = Field(True, description="a prompt whose leading blocks were computed before under the same "
                               "adapter version skips them (causal LMs); a seq2seq input encoded before under the "
                               "same adapter version skips its encoder")
    cuda_graphs: bool | None = Field(None, description="decode with static shapes, each bucket of rows captured as "
                                     "a CUDA graph (needs a CUDA device); a capture that fails or whose replay differs "
                                     "from the eager step turns graphs off, logged. Unset: on with CUDA, off elsewhere")
    max_queue: int = Field(1024, ge=1, description="requests waiting beyond this get 503")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="larger request bodies get 413")
    max_inputs_per_request: int = Field(64, ge=1)
    max_input_tokens: int = Field(512, ge=1)
    max_new_tokens: int = Field(256, ge=1, description="upper bound a request may ask for")
    default_max_new_tokens: int = Field(32, ge=1)
    max_num_beams: int = Field(8, ge=1, description="beams a request may ask for (at most max_batch_size: beams "
                               "decode as rows of the running batch)")
    max_choices: int = Field(32, ge=1)
    max_mix_tasks: int = Field(16, ge=1, le=1024, description="tasks one skill-space mix may hold")
    adapt_max_examples: int = Field(256, ge=1, description="examples one /adapt request may carry")
    adapt_max_steps: int = Field(2000, ge=1)
    adapt_max_seconds: float = Field(600.0, gt=0, description="a job stops (and saves) at this time cap")
    adapt_max_queued: int = Field(8, ge=1, description="queued adaptation jobs beyond this get 503")
    api_key: SecretStr | None = Field(None, description="when set, mutating routes need it (Bearer or X-API-Key)")
    api_key_all_routes: bool = Field(False, description="require the key on every route but health checks")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    keep_alive_s: int = Field(75, ge=1, description="idle keep-alive connections are closed after this; longer "
                                "than clients' own pool expiry (httpx: 5 s), so a client never reuses a connection "
                                "the server is closing at that moment")
    log_level: str = "info"

    @model_validator(mode="after")
    def _defaults_fit_limits(self) -> Settings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        longest_row = self.max_input_tokens + self.max_new_tokens + 1
        if self.max_batch_tokens < longest_row:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must hold one row of max_input_tokens + "
                             f"max_new_tokens + 1 = {longest_row} positions")
        return self
