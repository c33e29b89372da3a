python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/d/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
timeout 540 python3 -m sparsevid bench pareto --methods draft clustered --densities 0.1 0.25 \
  --option draft:tail=none --option draft:tail=pooled-var-32 --option clustered:tail=none --option clustered:tail=centroid \
  --option clustered:replan_every=1 --option clustered:replan_every=4 \
  --shapes wan1.3b-480p --reps 2 --testbeds large --cases 8 --steps 20 --quiet --out $OUT/pareto 2>&1 | grep -v Warn | tail -45
