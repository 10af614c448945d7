# fusedact on a CUDA GPU.
#   docker build -t fusedact .
#   docker run --rm --gpus all fusedact                          # the benchmark (python -m bench)
#   docker run --rm --gpus all fusedact python -m pytest -q      # the tests, compiled kernels on the GPU
#   docker run --rm --gpus all fusedact python -m bench.e2e      # a training step, patched vs unpatched
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Triton builds a small C launcher the first time each kernel runs; the runtime image has no C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/fusedact
COPY . .

# torch 2.5.1 and Triton 3.1.0 come with the image (the oldest versions pyproject.toml accepts): --no-deps keeps
# pip from replacing them. The rest is the test extra as pyproject.toml writes it (keep the two alike), none of
# which needs a different torch; it also gives the `fusedact` lab command its plots and datasets. numpy<2, not
# the extra's numpy<2.4: Triton 3.1's interpreter (a run without a GPU) needs it (README, Install).
RUN python -m pip install --no-cache-dir --no-deps -e . \
    && python -m pip install --no-cache-dir "pytest>=7" "numpy<2" matplotlib scikit-learn tqdm transformers

CMD ["python", "-m", "bench"]
