"""`ray job submit --working-dir . -- python jobs/train.py …`: same flags as `onenip train`."""
import sys

from onenip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
