"""Drives an OIP server with NVIDIA's tritonclient (a client we did not write); prints JSON.

Run as its own process: ``python tests/tritonclient_probe.py HOST:PORT``. tritonclient's generated
modules register the same protobuf names (``inference.*``) as ours, so the two cannot be imported in
one process; this script imports nothing from epgrpo. Inputs are built from a seed, so the test can
rebuild them and compare the scores with the in-process backends.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def inputs(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    return images, [f"a handwritten digit {d}" for d in range(5)]


def infer(client, model: str, images: np.ndarray, prompts: list[str] | None) -> list[float]:
    import tritonclient.grpc as triton

    tensors = [triton.InferInput("IMAGES", list(images.shape), "UINT8")]
    tensors[0].set_data_from_numpy(images)
    if prompts is not None:
        tensors.append(triton.InferInput("PROMPTS", [len(prompts)], "BYTES"))
        tensors[1].set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=np.object_))
    result = client.infer(model, tensors, outputs=[triton.InferRequestedOutput("SCORE")], request_id="probe-1")
    assert result.get_response().id == "probe-1"
    return result.as_numpy("SCORE").astype(float).tolist()


def main(address: str) -> int:
    # Imported here, not at the top: the test imports inputs() from this file without tritonclient.
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=address)
    images, prompts = inputs()
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(as_json=True),
        "digit_ready": client.is_model_ready("digit"),
        "nope_ready": client.is_model_ready("nope"),
        "digit_metadata": client.get_model_metadata("digit", as_json=True),
        "digit": infer(client, "digit", images, prompts),
        "jpeg": infer(client, "jpeg_compressibility", images, None),
    }
    for name, call in [("repository_index", client.get_model_repository_index),
                       ("unknown_model", lambda: infer(client, "nope", images, prompts)),
                       ("bad_prompt", lambda: infer(client, "digit", images[:1], ["a cat"]))]:
        try:
            call()
            out[name] = "no error"
        except InferenceServerException as exc:
            out[name] = {"status": exc.status(), "message": exc.message()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
