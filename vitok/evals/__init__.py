"""Evaluation networks and metrics, for any model family: PSNR / SSIM (metrics), LPIPS, Inception-v3
and its FID weights, I3D and the Frechet distance (fvd), the real-data statistics and protocols of
rFID / rFVD / gFID / gFVD (frechet), and the moving digits' classifier (digit_classifier)."""
