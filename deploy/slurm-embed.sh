#!/bin/bash
# SLURM: start a Ray head on the first node and workers on the others, then run `embed` on the head.
#   sbatch deploy/slurm-embed.sh /path/to/legacysurvey/dr10/south bricks.txt model.safetensors out.zarr
# Re-submitting the same command resumes: tiles already in the store are skipped.
#SBATCH --job-name=galaxalign-embed
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --gpus-per-node=1
#SBATCH --time=24:00:00
#SBATCH --output=galaxalign-embed-%j.log
set -euo pipefail
SURVEY=${1:?survey root}; BRICKS=${2:?bricks file}; MODEL=${3:?model}; OUT=${4:?output store}
VENV=${GALAXALIGN_VENV:-$PWD/.venv}
source "$VENV/bin/activate"

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
port=6379
echo "Ray head: $head ($head_ip:$port)"
srun --nodes=1 --ntasks=1 -w "$head" ray start --head --node-ip-address="$head_ip" --port=$port \
    --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="${SLURM_GPUS_PER_NODE:-0}" --block &
sleep 15
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" ray start --address="$head_ip:$port" \
      --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="${SLURM_GPUS_PER_NODE:-0}" --block &
done
sleep 15
galaxalign-batch --no-progress embed --address "$head_ip:$port" --tiles "$SURVEY" --bricks-file "$BRICKS" \
    --model "$MODEL" --out "$OUT" && status=0 || status=$?
ray stop || true
exit $status
