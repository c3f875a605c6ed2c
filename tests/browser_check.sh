#!/usr/bin/env bash
# A real-browser check of the HTML report (not part of the pytest suite: it runs the CI grid, minutes).
# Runs config/ci.yaml in a work folder, builds `snakemake --report report.html` and screenshots its
# pages with headless Chromium (Debian: apt-get update && apt-get install -y chromium).
# Usage: bash tests/browser_check.sh [WORKDIR]   (default: /tmp/redi-browser-check; screenshots land
# there as report-*.png, outside the repository, so they never reach git).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-/tmp/redi-browser-check}"
CHROMIUM="$(command -v chromium || command -v chromium-browser || true)"
if [[ -z "$CHROMIUM" ]]; then
    echo "browser_check: chromium not found; install it: apt-get update && apt-get install -y chromium" >&2
    exit 2
fi
mkdir -p "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
SMK=(python -m snakemake -s "$REPO/Snakefile" --directory "$WORK" --configfile "$REPO/config/ci.yaml")
"${SMK[@]}" --cores 2 > "$WORK/run.log" 2>&1 || { tail -30 "$WORK/run.log"; exit 1; }
"${SMK[@]}" --report "$WORK/report.html" > "$WORK/report.log" 2>&1 || { tail -30 "$WORK/report.log"; exit 1; }
shot() {  # shot NAME URL-FRAGMENT: one page of the report's single-page app, 1400 px wide
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=15000 \
        --window-size=1400,1800 --screenshot="$WORK/report-$1.png" "file://$WORK/report.html$2" \
        > /dev/null 2>&1
    echo "$WORK/report-$1.png"
}
shot start ""
# the report's categories (workflow/rules/evaluate.smk): the results table and the plots
python - "$WORK/report.html" <<'EOF'
import sys
html = open(sys.argv[1], encoding="utf-8").read()
missing = [n for n in ("tables.md", "fid_vs_step.png", "grids.png", "training.png") if n not in html]
print("report.html embeds tables.md, fid_vs_step.png, grids.png, training.png" if not missing
      else f"report.html lacks {', '.join(missing)}")
sys.exit(1 if missing else 0)
EOF
