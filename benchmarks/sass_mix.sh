#!/usr/bin/env bash
# Instruction mix of the headline fused kernels (bf16, d=64: the 4-warp forward, the 8-warp
# backward), read from compiled code with cuobjdump, no GPU needed:
#   bash benchmarks/sass_mix.sh [FILE]      # FILE: the built library (default pka_ext/_C*.so) or a .o
# Counts each opcode's static occurrences: 16-byte loads (LDG.E.128), ldmatrix (LDSM), generic
# loads (LD.E), tensor-core products (HMMA), local-memory traffic (LDL / STL). CUOBJDUMP overrides
# the tool (a machine without the CUDA toolkit's cuobjdump can use the nvidia-cuda-cuobjdump wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
file=${1:-$(ls pka_ext/_C*.so)}
# Opcode of each SASS line ("/*0a10*/  @P0 LDG.E.128 R4, [R2.64] ;" -> LDG.E.128).
opcodes() {
  awk '{ for (i = 1; i < NF; i++) if ($i ~ /^\/\*[0-9a-f]+\*\/$/) { j = i + 1; if ($j ~ /^@/) j++;
         sub(/;$/, "", $j); print $j; break } }'
}
for f in _ZN3pka5fused14pka_fwd_kernelI13__nv_bfloat16Li64ELi4EEEvNS0_6ParamsIT_EE \
         _ZN3pka5fused14pka_bwd_kernelI13__nv_bfloat16Li64ELi8EEEvNS0_6ParamsIT_EE; do
  echo "== $f"
  "${CUOBJDUMP:-cuobjdump}" -sass -fun "$f" "$file" | opcodes | sort | uniq -c | sort -rn
done
