#!/usr/bin/env bash
# A real-browser check of the HTML report (not part of the pytest suite: it runs the CI grid, minutes).
# Runs config/ci.yaml in a work folder, builds `snakemake --report report.html` and screenshots its
# pages with headless Chromium (Debian: apt-get update && apt-get install -y chromium) driven by
# Playwright (pip install playwright).
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
# Every page a reader opens: the landing page, then each result of each category (its eye icon shows
# it in the report's viewer). Clicking needs Playwright driving the system Chromium
# (pip install playwright; no browser download: it is given Chromium's path).
python - "$WORK" "$CHROMIUM" <<'EOF'
import sys
from pathlib import Path

work, chromium = Path(sys.argv[1]), sys.argv[2]
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sys.exit("browser_check: Playwright is missing: pip install playwright (it drives the system Chromium)")
shots = []
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"file://{work}/report.html")
    page.wait_for_timeout(2000)
    page.screenshot(path=str(work / "report-start.png"))
    shots.append("report-start.png")
    for category in ("Results", "Samples", "Training"):
        page.get_by_text(category, exact=True).last.click()  # the first match is the sidebar's heading
        page.wait_for_timeout(800)
        rows = page.locator("tr:has(td)")  # the header row has th cells only
        for i in range(rows.count()):
            label = rows.nth(i).locator("td").first.inner_text().strip()
            rows.nth(i).locator("a").first.click()  # the eye icon: shows the result
            page.wait_for_timeout(1500)
            name = f"report-{category.lower()}-{i}.png"
            page.screenshot(path=str(work / name))
            shots.append(f"{name} ({label})")
        page.goto(f"file://{work}/report.html")  # back to the landing page for the next category
        page.wait_for_timeout(1500)
    browser.close()
print("\n".join(f"{work}/{s}" for s in shots))
EOF
# the report's categories (workflow/rules/evaluate.smk): the results table and the plots
python - "$WORK/report.html" <<'EOF'
import sys
html = open(sys.argv[1], encoding="utf-8").read()
missing = [n for n in ("tables.html", "fid_vs_step.png", "fid_by_run.png", "grids.png", "training.png") if n not in html]
print("report.html embeds tables.html, fid_vs_step.png, fid_by_run.png, grids.png, training.png" if not missing
      else f"report.html lacks {', '.join(missing)}")
sys.exit(1 if missing else 0)
EOF
