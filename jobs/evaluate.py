"""`ray job submit --working-dir . -- python jobs/evaluate.py …`: same flags as `onenip evaluate`."""
import sys

from onenip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
