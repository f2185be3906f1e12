#!/usr/bin/env bash
# The whole test suite: lint (ruff), types (mypy --strict), unit tests, and integration tests
# against real QEMU guests, in three passes:
#   1. everything, against the distribution's QEMU (7.2 on Debian 12, 10 on Debian 13);
#   2. on Debian 12: what depends on QEMU's version again (its argv and probes, the guests'
#      boots, checkpoints, hibernation, pause, the tree, restores, faults and kill -9 during
#      saves, bmigrate with its checkpoints, a clone's NIC swap, bsnapshot's QMP transaction),
#      against QEMU 10 from bookworm-backports, extracted privately by
#      scripts/qemu10.sh (CBSD_QEMU, CBSD_QEMU_IMG); the argument, network, guest-agent and
#      bmove/export suites do not differ with QEMU and stay with pass 1;
#   3. the fault, corruption, kill -9 and checkpoint suites again with every workdir on a
#      loop-mounted XFS that clones files (CBSD_TEST_RAMFILE=1): VMs keep their RAM in a file;
#      only the tests whose workdir is the `cbsd` fixture's (what the variable moves) run
#      (tests/conftest.py deselects the others: they would run as in pass 1); test_ramfile.py
#      and test_ramfile_space.py make their own XFS in pass 1 already;
#   4. on Debian 12: Debian 13 (trixie), built with debootstrap, in a chroot (scripts/trixie.sh):
#      the demo, then passes 1 and 3 of this script with CBSD_TEST_SELECTION=trixie.
# Extra arguments go to pytest in every pass (e.g. scripts/test.sh -k checkpoint).
# CBSD_TEST_PASSES=1 (or "1 3", ...) runs only those passes (a quick run picks one).
# CBSD_TEST_SELECTION=trixie: passes 1 and 3 only, pass 1 on what differs with the distribution
# (its QEMU, Python, kernel package, packages): the unit tier, the Linux guest, checkpoints,
# hibernation, hostile conditions, trust (one host: test_trust*.py but the two-host one), the network (network namespaces, cbsd0's dnsmasq and nftables), and the service's API (its web stack on that Python), the cluster
# (its etcd, its Python's TLS, QEMU's bitmaps and backup jobs in replication); the
# Debian guest and the longer suites stay with the host's pass 1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench scripts
.venv/bin/mypy --strict src/cbsd
passes=${CBSD_TEST_PASSES:-1 2 3 4}
selection=()
if [ "${CBSD_TEST_SELECTION:-}" = trixie ]; then
    passes=${CBSD_TEST_PASSES:-1 3}
    # The RAM-file suites (their own reflink XFS) and the full-disk fault run here, in pass
    # 1: pass 3 deselects what does not use the `cbsd` fixture's workdir (tests/conftest.py).
    selection=(-m "not debian" tests/unit tests/integration/test_linux_guest.py
               tests/integration/test_checkpoints.py tests/integration/test_suspend.py
               tests/integration/test_hostile_conditions.py
               tests/integration/test_trust_definition.py
               tests/integration/test_trust_images.py tests/integration/test_network.py
               tests/integration/test_api.py tests/integration/test_ramfile.py
               tests/integration/test_ramfile_space.py
               tests/integration/test_faults.py::test_full_disk
               tests/integration/test_cluster.py tests/integration/test_replicate.py
               tests/integration/test_ha.py)
fi
# Pass 2's selection: the tests whose outcome can change with QEMU's version.
qemu_dependent=(tests/unit/qemu tests/integration/test_linux_guest.py
    tests/integration/test_lifecycle.py tests/integration/test_checkpoints.py
    tests/integration/test_suspend.py tests/integration/test_pause.py
    tests/integration/test_tree.py tests/integration/test_clock.py
    tests/integration/test_vmgenid.py tests/integration/test_dedup.py
    tests/integration/test_ramfile.py tests/integration/test_hostile_conditions.py
    tests/integration/test_faults.py tests/integration/test_kill_loop.py
    tests/integration/test_trust_definition.py tests/integration/test_many_hosts.py
    tests/integration/test_nics.py tests/integration/test_clone_identity.py
    tests/integration/test_bsnapshot.py
    tests/integration/test_migrate_checkpoints.py::test_bmigrate_carries_the_checkpoint_tree)
status=0
for pass in $passes; do
    case $pass in
        1)
            echo "== pass 1: the distribution's QEMU ($(qemu-system-x86_64 --version | head -1))"
            .venv/bin/python -m pytest --durations=15 "${selection[@]}" "$@" || status=1
            ;;
        2)
            system_major=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p')
            if [ "${system_major:-0}" -ge 10 ]; then
                echo "== pass 2: the distribution's QEMU is already 10 or newer: pass 1 covered it"
                continue
            fi
            q10=$(bash scripts/qemu10.sh)
            echo "== pass 2: QEMU 10 from bookworm-backports ($("$q10/bin/qemu-system-x86_64" --version | head -1))"
            # The many-hosts suite's bmove/export cases reuse what the rest covers on QEMU 10;
            # its bmigrate cases are QEMU's own migration and mirror: they run here too.
            CBSD_QEMU="$q10/bin/qemu-system-x86_64" CBSD_QEMU_IMG="$q10/bin/qemu-img" \
                .venv/bin/python -m pytest --durations=10 -m "not debian" \
                -k "not test_many_hosts or bmigrate" "${qemu_dependent[@]}" "$@" || status=1
            ;;
        3)
            echo "== pass 3: workdirs on XFS with reflink (guest RAM in a file)"
            CBSD_TEST_RAMFILE=1 .venv/bin/python -m pytest "$@" \
                tests/integration/test_hostile_conditions.py tests/integration/test_faults.py \
                tests/integration/test_kill_loop.py tests/integration/test_checkpoints.py \
                tests/integration/test_suspend.py tests/integration/test_tree.py \
                || status=1
            ;;
        4)
            if ! grep -qx 'VERSION_ID="12"' /etc/os-release; then
                echo "== pass 4: not a Debian 12 host: passes 1 and 3 ran on this system itself"
                continue
            fi
            echo "== pass 4: Debian 13 (trixie) in a chroot: the demo, passes 1 and 3"
            bash scripts/trixie.sh "$@" || status=1
            ;;
        *) echo "unknown pass $pass" >&2; exit 2 ;;
    esac
done
exit $status
