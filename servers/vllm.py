"""Building the `vllm serve` command for a model (vLLM lives in the optional `vllm` extra).

Quantization maps to vLLM's flags: awq, gptq (pre-quantized checkpoints) and bitsandbytes
(in-flight 4-bit); a GGUF file is served as it is (vLLM reads its quantization) with the
tokenizer extracted from it as --tokenizer; the GPU count becomes --tensor-parallel-size, and
--pipeline-parallel-size / --data-parallel-size pass through. With a Ray head address the server
runs on the Ray cluster (multi-node: tensor parallel within a node, pipeline parallel across
nodes; `--distributed-executor-backend ray`, RAY_ADDRESS in its environment). Anything vLLM offers beyond
these goes through `extra` unchanged. An API key reaches vLLM as $VLLM_API_KEY, never on the
command line (where `ps` would show it). The process itself is started and stopped by
servers/process.py like every other backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VLLM_QUANTS = {"none": None, "awq": "awq", "gptq": "gptq", "bnb4": "bitsandbytes"}


@dataclass
class VLLMSpec:
    model: str
    port: int
    host: str = "127.0.0.1"
    served_model_name: str | None = None
    quant: str = "none"
    num_gpus: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    embed: bool = False
    tokenizer: str | None = None  # a GGUF model's tokenizer folder (vLLM documents --tokenizer for GGUF)
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    ray_address: str | None = None  # a running Ray cluster's head (host:port): multi-node serving
    executable: str = "vllm"
    extra: list[str] = field(default_factory=list)


def build_command(spec: VLLMSpec) -> list[str]:
    if spec.quant not in VLLM_QUANTS:
        raise ValueError(f"vLLM backend: unknown --quant {spec.quant!r}: choose from {', '.join(VLLM_QUANTS)} "
                         f"(hqq and bnb8 need --backend hf)")
    cmd = [spec.executable, "serve", spec.model, "--host", spec.host, "--port", str(spec.port),
           "--served-model-name", spec.served_model_name or spec.model, "--tensor-parallel-size", str(spec.num_gpus)]
    if VLLM_QUANTS[spec.quant]:
        cmd += ["--quantization", VLLM_QUANTS[spec.quant]]
    if spec.max_model_len:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.embed:
        cmd += ["--runner", "pooling"]
    if spec.tokenizer:
        cmd += ["--tokenizer", spec.tokenizer]
    if spec.pipeline_parallel_size > 1:
        cmd += ["--pipeline-parallel-size", str(spec.pipeline_parallel_size)]
    if spec.data_parallel_size > 1:
        cmd += ["--data-parallel-size", str(spec.data_parallel_size)]
    if spec.ray_address:
        cmd += ["--distributed-executor-backend", "ray"]
    return cmd + list(spec.extra)


def gpus_per_server(spec: VLLMSpec) -> int:
    """GPUs one server uses on this node (none to pin when Ray places the workers)."""
    return 0 if spec.ray_address else spec.num_gpus * spec.pipeline_parallel_size * spec.data_parallel_size
