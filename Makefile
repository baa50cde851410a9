# Two commands for a fresh machine:  `make run`  (start the app)  and  `make test`  (run the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast bench app-bench screenshots browser-deps pacs-deps pacs clean-venv

# The virtual environment is (re)built whenever requirements.txt changes.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m streamlit run app.py --server.address 127.0.0.1

# Headless Chromium from Debian for the browser test; skipped quietly where apt is not available.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium not installed: the browser test will be skipped"; fi; }

# Orthanc and its DICOMweb plugin from Debian for the archive tests and `make pacs`; skipped quietly where
# apt is not available (the archive tests then skip with the reason).
pacs-deps:
	@# the same places boneai.pacs_server looks: Orthanc on PATH or in /usr/sbin, the plugin in either folder
	@{ { command -v Orthanc || test -x /usr/sbin/Orthanc; } >/dev/null 2>&1 && \
	   ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* /usr/lib/orthanc/plugins/libOrthancDicomWeb.so* 2>/dev/null | grep -q .; } || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null \
	      || echo "could not install Orthanc: the archive tests will be skipped"; \
	  else echo "Orthanc not installed: the archive tests will be skipped"; fi; }

# A local archive with the sample studies: our own Orthanc configuration, loopback only, storage in .pacs/.
# Then `BONEAI_PACS_URL=http://127.0.0.1:$(PACS_HTTP_PORT)/dicom-web make run` shows it on the Worklist page.
PACS_HTTP_PORT  ?= 8042
PACS_DICOM_PORT ?= 4242
pacs: $(STAMP) pacs-deps
	$(PY) -m boneai.pacs_server --dir .pacs --http-port $(PACS_HTTP_PORT) --dicom-port $(PACS_DICOM_PORT)

test: $(STAMP) browser-deps pacs-deps
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not browser"

bench: $(STAMP)
	$(PY) bench/inference_latency.py

# App figures in headless Chromium: 4-view study upload to probabilities and heatmaps, start to first
# page; four reviewers uploading and saving at the same moment.
app-bench: $(STAMP) browser-deps
	$(PY) bench/app_bench.py
	$(PY) bench/concurrent_reviewers.py

# One screenshot per page into docs/screenshots/ (for the README).
screenshots: $(STAMP) browser-deps
	$(PY) docs/screenshots.py

clean-venv:
	rm -rf $(VENV)
