"""`ray job submit --working-dir . -- python jobs/add_class.py …`: same flags as `onenip add-class`."""
import sys

from onenip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["add-class", *sys.argv[1:]]))
