#!/usr/bin/env bash
# Make a Debian "slim" base image locally, where no registry can be reached:
#   scripts/debian-slim.sh SUITE TAG [MIRROR]      e.g. scripts/debian-slim.sh trixie debian:trixie-slim
# debootstrap --variant=minbase, then what Docker's official -slim images do to stay small: no
# documentation, man pages or translations, now or in any later `apt-get install` (dpkg path
# excludes), and apt leaves neither its package caches nor downloaded .deb files in a layer.
set -euo pipefail
suite=$1 tag=$2 mirror=${3:-http://deb.debian.org/debian}
rootfs=$(mktemp -d "/tmp/$suite-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"/tmp/debootstrap-$suite.log" 2>&1 \
    || { echo "debootstrap of $suite failed; see /tmp/debootstrap-$suite.log" >&2; exit 1; }

cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
DPKG
cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
printf 'Acquire::Languages "none";\n' > "$rootfs/etc/apt/apt.conf.d/docker-no-languages"
printf 'APT::AutoRemove::SuggestsImportant "false";\n' > "$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
# What debootstrap already installed, as the excludes would have left it.
find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/groff/* "$rootfs"/usr/share/info/* \
       "$rootfs"/usr/share/lintian/* "$rootfs"/usr/share/linda/*
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
       "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
tar -C "$rootfs" -c . | docker import --change 'LABEL org.criu-supervisor.slim=1' --change 'CMD ["bash"]' - "$tag" >/dev/null
