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

# torch and triton come with the image: --no-deps keeps pip from replacing them. The rest is the test extra
# (pyproject.toml: pytest, numpy, matplotlib, scikit-learn, tqdm, transformers), none of which needs a
# different torch; it also gives the `fusedact` lab command its plots and datasets.
RUN python -m pip install --no-cache-dir --no-deps -e . \
    && python -m pip install --no-cache-dir "pytest>=7" numpy matplotlib scikit-learn tqdm transformers

CMD ["python", "-m", "bench"]
