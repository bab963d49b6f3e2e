"""`ray job submit --working-dir . -- python jobs/score.py …`: same flags as `onenip score`."""
import sys

from onenip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
