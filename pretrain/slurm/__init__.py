"""SLURM: `pretrain submit` (`job`: render the sbatch script from `train.sbatch.template` and
submit it) and `pretrain status` (`status`). `local/up.sh` and `local/down.sh` start and stop a
one-node test cluster. The template and scripts ship in the wheel beside this file."""
