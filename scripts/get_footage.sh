#!/usr/bin/env bash
# Real footage and photos as benign training backgrounds for the patch detector (issue #15), offline.
#
# Sources, all from Debian/Ubuntu packages (no download from this script beyond apt):
#   opencv-doc          /usr/share/doc/opencv-doc/examples/data: vtest.avi (a static surveillance
#                       camera, 795 frames 768x576), Megamind.avi, Megamind_bugy.avi, tree.avi and
#                       ~120 jpg/png photos
#   gnome-backgrounds   /usr/share/backgrounds/gnome (webp/png/jpg; svg is skipped)
#   mate-backgrounds    /usr/share/backgrounds/mate
#   scikit-image        its bundled photos (site-packages/skimage/data), already in the venv
#
# Output (git-ignored): data/footage/{train,test}/*.npy (uint8 (T, 64, 64, 3) clips) and
# data/footage/footage.json, written last. The split follows file names (vtest.avi is always
# test); see streamguard/data/footage.py. Rerunning resumes: finished sources are kept.
#
# Usage: scripts/get_footage.sh [extra `streamguard data footage` options, e.g. --workers 2]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s opencv-doc gnome-backgrounds mate-backgrounds >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO apt-get install -y opencv-doc gnome-backgrounds mate-backgrounds
fi

STREAMGUARD="${STREAMGUARD:-streamguard}"
if [ -x .venv/bin/streamguard ]; then STREAMGUARD=.venv/bin/streamguard; fi
# no FOLDER arguments: the Debian folders above and scikit-image's photos, those that exist
"$STREAMGUARD" data footage --output data/footage "$@"
