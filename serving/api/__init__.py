"""The HTTP service (BentoML): endpoints, micro-batching, settings, URL fetching, HTTP guards.

Importing this package sets ``OMP_NUM_THREADS=1`` for the process: FAISS (the embedded index, and Milvus Lite,
which searches with FAISS) then runs on one OpenMP thread in every thread, one query per request, where an
OpenMP team of every core only spin-waited against the model workers (a one-query /search cost 8.9 ms of
IndexOwner CPU, 2.5 ms on one thread: bench/serve_profile.py). ``faiss.omp_set_num_threads`` holds only for the
thread that calls it, and BentoML and our channel run index calls in pool threads, whose default the OpenMP
runtime reads from the environment once, when FAISS loads it; every process of the service imports this package
before anything that loads FAISS, so this is the one place early enough.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
