#!/usr/bin/env bash
# Install Slurm + munge (Debian packages) so that tests/slurm/ can run a real local cluster.
# Only the binaries: no daemon is started and no system config is changed (tests/slurm/cluster.py runs
# munged/slurmctld/slurmd from a temp directory; there is no systemd in CI). Needs root.
# Usage: bash scripts/install_slurm.sh      (a no-op when the binaries are already there)
set -euo pipefail
if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null; then
    echo "slurm already installed: $(dpkg-query -W -f '${Version}' slurm-client 2>/dev/null || echo unknown version)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: skips the mail/X11/... recommends the daemons do not need.
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "installed slurm $(dpkg-query -W -f '${Version}' slurm-client)"
