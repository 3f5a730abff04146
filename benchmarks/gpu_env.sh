# Sourced by the GPU scripts (gpu_check.sh, gpu_recipes.sh): the lent device machine has no
# internet and no albumentations (../shared/device/README.md). Put the wheels and the data
# zip in .dev/ (git-ignored) and carry .dev; where albumentations is missing this installs the wheels
# into /tmp/site (once per machine),
# unpacks the zip to $DATA, and writes what the device is to $OUT/device.txt.
export PYTHONUNBUFFERED=1
if ls .dev/*.whl >/dev/null 2>&1 && ! python3 -c "import albumentations" 2>/dev/null; then
  if [ ! -d /tmp/site/albumentations ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/*.whl
  fi
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ ! -d "$DATA/train" ] && [ -f .dev/cifar10-jpeg.zip ]; then
  python3 -m zipfile -e .dev/cifar10-jpeg.zip "$DATA"   # holds train/ and test/
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"
