"""The naive baseline a team would write: the Keras model behind FastAPI + uvicorn, one model call per request."""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Response
from numpy.typing import NDArray


def make_app(model_path: str, call: str = "call") -> FastAPI:
    import keras

    model = keras.models.load_model(model_path)
    app = FastAPI()

    def score(x: NDArray[Any]) -> NDArray[Any]:
        # model.predict builds a tf.data pipeline per call; model(x) is the cheaper of the two obvious choices.
        if call == "predict":
            return np.asarray(model.predict(x, verbose=0)).ravel()
        return np.asarray(model(x, training=False)).ravel()

    score(np.zeros((200, model.input_shape[1]), dtype=np.float32))  # trace once before the first request

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, list[float]]:
        # The usual JSON contract: {"instances": [[...], ...]} -> {"predictions": [...]}.
        body = await request.json()
        x = np.asarray(body["instances"], dtype=np.float32)
        return {"predictions": score(x).tolist()}

    @app.post("/predict_binary")
    async def predict_binary(request: Request) -> Response:
        # Raw little-endian float32 rows in, float32 scores out: the same server without JSON's cost.
        x = np.frombuffer(await request.body(), dtype=np.float32).reshape(-1, model.input_shape[1])
        return Response(content=score(x).astype(np.float32).tobytes(), media_type="application/octet-stream")

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="path to model.keras")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--call", choices=("call", "predict"), default="call", help="model(x) or model.predict(x)")
    a = p.parse_args()
    uvicorn.run(make_app(a.model, a.call), host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
