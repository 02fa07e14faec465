"""One command each, over the library: mea-compare, mea-export, mea-compress, mea-kv-report, mea-launch (and its
cluster check), mea-gpu-check (`make gpu-check`), mea-wheelhouse (wheels for an offline GPU node), the W&B workspace."""
