"""How docs/img/progress_widget*.png were made: JupyterLab on loopback, driven by headless Chromium.

Not part of the package or the tests (it needs Chromium and JupyterLab, which matcalc does not
depend on). Steps, as run for the committed screenshots (JupyterLab 4.6.6, Chromium 156, Debian):

    apt-get install -y chromium
    python3 -m venv /tmp/labenv && /tmp/labenv/bin/pip install jupyterlab "jupyterlab_widgets==3.0.17" playwright
    # a kernelspec for the matcalc venv (ipywidgets 8.1 there), served by the lab of /tmp/labenv:
    mkdir -p /tmp/labjp/kernels/matcalc && cat > /tmp/labjp/kernels/matcalc/kernel.json <<JSON
    {"argv": ["/path/to/matcalc/.venv/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
     "display_name": "matcalc", "language": "python", "env": {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}}
    JSON
    # /tmp/labnb/widget_check.ipynb: one cell with kernel "matcalc" holding CELL below
    cd /tmp/labnb && JUPYTER_PATH=/tmp/labjp jupyter lab --allow-root --no-browser --ip 127.0.0.1 \
        --port 8899 --ServerApp.token='' --ServerApp.password='' &
    /tmp/labenv/bin/python docs/img/screenshot.py
"""

import time

CELL = '''import matcalc as mc
from ase.build import bulk
cl = mc.cluster.start(n_gpus=0, n_workers=1, threads_per_worker=2, torch_threads=1, preload=("emt",), dashboard=False)
cells = []
for i, (m, a) in enumerate([("Cu", 3.61), ("Ni", 3.52), ("Pd", 3.89), ("Ag", 4.09), ("Au", 4.08)]):
    at = bulk(m, "fcc", a=a, cubic=True).repeat(3); at.rattle(0.15, seed=i); at.info["label"] = f"{m}108"
    cells.append(at)
fe = bulk("Fe", "bcc", a=2.87, cubic=True); fe.info["label"] = "Fe (not in EMT)"
tasks = cl.map("relax", cells, model="emt", fmax=1e-4, optimizer="FIRE", relax_cell=False, max_steps=4000)
tasks.append(cl.submit("relax", fe, model="emt"))
mc.widgets.progress(tasks)'''


def main(url: str = "http://127.0.0.1:8899/lab/tree/widget_check.ipynb") -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("text=matcalc | Idle", timeout=120_000)
        time.sleep(2)
        try:
            page.get_by_role("button", name="No", exact=True).click(timeout=3000)  # the news toast
        except Exception:  # noqa: BLE001
            pass
        page.click(".jp-Notebook .jp-Cell .jp-InputPrompt")
        page.click("jp-button[data-command='notebook:run-cell-and-select-next']")
        page.wait_for_selector(".widget-vbox", timeout=180_000)
        widget = page.locator(".jp-OutputArea-output:has(.widget-vbox)").first
        shot, t0 = False, time.time()
        while time.time() - t0 < 300:
            time.sleep(2)
            text = widget.inner_text()
            if not shot and "RUNNING" in text:
                page.screenshot(path="docs/img/progress_widget.png")  # the cell is done, the kernel idle
                shot = True
            if all(s not in text for s in ("RUNNING", "QUEUED", "ASSIGNED", "PENDING")):
                break
        time.sleep(2)
        widget.screenshot(path="docs/img/progress_widget_done.png")
        browser.close()


if __name__ == "__main__":
    main()
