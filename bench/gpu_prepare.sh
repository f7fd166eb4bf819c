#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what bench/gpu.sh needs on a GPU machine that cannot reach the
# network: the UC Merced images (from ../shared/data/uc_merced) and wheels of the Python
# packages its image lacks (Keras 3 and its small dependencies, fvcore for the comparison).
# Run here, then on the device: carry [".gpu"], command `bash bench/gpu.sh $OUT`.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/uc_merced/UCMerced_LandUse}
test -d "$SRC/Images" || { echo "UC Merced images not found at $SRC: pass the folder holding Images/" >&2; exit 2; }
mkdir -p .gpu/whl .gpu/data
rm -rf .gpu/data/UCMerced_LandUse && cp -r "$SRC" .gpu/data/UCMerced_LandUse
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .gpu/whl \
  keras==3.15.1 namex optree
python3 -m pip download -q --no-deps -d .gpu/whl fvcore==0.1.5.post20221221 yacs iopath termcolor
# fvcore and iopath come as sdists: build them into wheels (pure Python)
for sdist in .gpu/whl/*.tar.gz; do
  [ -e "$sdist" ] || continue
  python3 -m pip wheel -q --no-deps -w .gpu/whl "$sdist" && rm "$sdist"
done
du -sh .gpu
